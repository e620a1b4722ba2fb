"""The REPL: headless (prompt_toolkit pipe input) and in a real pseudo-terminal, on a real cluster."""
import json
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
from conftest import terminal_repl
from prompt_toolkit.document import Document
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output.plain_text import PlainTextOutput

from llaisys_chat.client.ranks import counted
from llaisys_chat.frontends.commands import CommandCompleter, Commands
from llaisys_chat.repl import Repl

CHAT = Path(sys.executable).parent / "llaisys-chat"
ESC_ENTER = "\x1b\r"


@pytest.fixture(scope="module")
def client(demo_client):
    return demo_client


def run_repl(client, keys: str, **session_options):
    """Type `keys` into a headless REPL until input runs out; returns (printed text, session)."""
    session = client.session(temperature=0, max_new_tokens=40, **session_options)
    out = StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        pipe.close()
        Repl(client, session, input=pipe, output=PlainTextOutput(out), history=InMemoryHistory()).run()
    return out.getvalue().replace("\r\n", "\n"), session


def test_banner_reply_and_stats(client):
    printed, session = run_repl(client, "What is 2 + 2?\r/stats\r")
    banner = printed.splitlines()[0]
    assert banner == "llaisys-chat · qwen2.5-coder:0.5b · 2 ranks · 8192-token context · /help for help, Ctrl-D to quit"
    assert session.messages[0] == {"role": "user", "content": "What is 2 + 2?"}
    assert "4" in session.messages[1]["content"]
    assert session.messages[1]["content"][:20] in printed
    assert "tokens (stop); prompt" in printed and "decode" in printed


def test_counts_in_messages_read_as_words():
    """The banner, the status line and the start-up messages count ranks (a 2-core machine starts 1)."""
    assert counted(1, "rank") == "1 rank"
    assert counted(2, "MPI engine") == "2 MPI engines"
    assert counted(0, "thread") == "0 threads"


def test_multi_turn_undo_retry_and_reset(client):
    keys = ("My name is Ada.\r"
            "What is my name?\r"
            "/undo\r"
            "What is my name? Answer in one word.\r"
            "/retry\r")
    printed, session = run_repl(client, keys)
    assert "Removed: What is my name?" in printed
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == "What is my name? Answer in one word."
    assert "Ada" in session.messages[3]["content"]
    printed, session = run_repl(client, "Hello\r/reset\r")
    assert "New conversation." in printed and session.messages == []


def test_multi_line_input(client):
    printed, session = run_repl(client, f'Line one{ESC_ENTER}line two\r"""\nblock one\nblock two\n"""\r')
    assert session.messages[0]["content"] == "Line one\nline two"
    assert session.messages[2]["content"] == "block one\nblock two"


def test_save_load_set_show_and_system(client, tmp_path):
    path = tmp_path / "chat.json"
    keys = (f"/system You are a pirate.\r/set temperature 0.5\r/set max_tokens 12\rSay hi.\r/save {path}\r"
            "/show\r")
    printed, session = run_repl(client, keys)
    assert "temperature = 0.5" in printed and "max_tokens = 12" in printed
    assert json.loads(path.read_text())["system"] == "You are a pirate."
    assert "Ranks: 2" in printed and "Context:" in printed and "temperature=0.5" in printed
    printed, loaded = run_repl(client, f"/load {path}\r")
    assert "Loaded 2 messages" in printed
    assert loaded.messages == session.messages and loaded.system == "You are a pirate."
    assert loaded.sampling["max_new_tokens"] == 12


@pytest.mark.parametrize("command,hint", [
    ("/frobnicate", "unknown command /frobnicate"),
    ("/set temperature hot", "temperature must be a number"),
    ("/set top_k -3", "top_k must be a whole number >= 0"),
    ("/set warmth 1", "unknown parameter warmth"),
    ("/undo", "nothing to undo"),
    ("/retry", "there is no reply to retry"),
    ("/load /nonexistent/file.json", "cannot read /nonexistent/file.json"),
    ("/think maybe", "usage: /think show|hide"),
    ('/save "unterminated', "cannot parse the command"),
])
def test_bad_commands_get_a_one_line_hint(client, command, hint):
    printed, _ = run_repl(client, command + "\r")
    error_lines = [line for line in printed.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and hint in error_lines[0]
    assert "Traceback" not in printed


def test_quit_commands(client):
    for command in ("/quit", "/exit", "/bye"):
        printed, session = run_repl(client, f"{command}\rThis is never sent\r")
        assert session.messages == []


def test_completion():
    completer = CommandCompleter()

    def complete(text):
        return [c.text for c in completer.get_completions(Document(text), None)]

    assert complete("/se") == ["/set"]
    assert complete("/set t") == ["temperature", "top_k", "top_p"]
    assert complete("/think ") == ["show", "hide"]
    assert complete("hello") == []


def test_thinking_is_dimmed_hidden_and_not_fed_back(client):
    session = client.session()
    session.messages = [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "<think>The user greets me.</think>\n\nHello!"}]
    assert session.prompt_messages()[1]["content"] == "Hello!"
    commands = Commands(session, client)
    commands.run("/think hide")
    assert commands.show_thinking is False


def test_piped_standard_input_prints_plain_replies(running_cluster):
    result = subprocess.run([CHAT, "--temperature", "0", "--max-tokens", "30"], input="What is 2 + 2?\n/stats\n",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "4" in result.stdout and "\x1b[" not in result.stdout
    assert "tokens (stop)" in result.stdout


def test_a_short_chat_with_the_1_5b_built_in(tmp_path):
    """On a cluster of its own (started and stopped by llaisys-chat), so the shared one keeps the demo."""
    env = {**__import__("os").environ, "IPYTHONDIR": str(tmp_path)}
    result = subprocess.run([CHAT, "--model", "qwen2.5-coder:1.5b", "--cluster-id", "one-five", "-n", "2",
                             "--temperature", "0", "--max-tokens", "40"],
                            input="What is the capital of France? One word.\nAnd of Italy? One word.\n/show\n",
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "Rome" in result.stdout
    assert "Model: qwen2.5-coder:1.5b" in result.stdout and "weights q4_k+q6_k" in result.stdout


def test_real_terminal_session(running_cluster):
    """Type in a pseudo-terminal: a reply streams in, Ctrl-C stops a long one, a follow-up works, Ctrl-D quits."""
    with terminal_repl() as child:
        child.expect("Ctrl-D to quit")
        child.expect(">>> ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect(">>> ")
        child.sendline("Write a very long essay about the history of computing, with many sections.")
        child.expect(r"\w+ \w+ \w+")  # the reply is streaming
        time.sleep(1.5)
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect(">>> ")
        child.sendline("What was my first question? Answer briefly.")
        child.expect("capital")


def test_replies_of_templates_that_open_reasoning_render_as_reasoning():
    from llaisys_chat.frontends.render import StreamRenderer
    from llaisys_chat.protocol.messages import opens_reasoning

    assert opens_reasoning("<|im_start|>assistant\n<think>\n") and not opens_reasoning("<think>a</think>\nok")
    fragments = []
    renderer = StreamRenderer(lambda formatted: fragments.extend(formatted))
    for piece in ["<think>", "Weighing ", "options.</th", "ink>\n\nAnswer."]:
        renderer.feed(piece)
    renderer.finish()
    dim = "".join(text for style, text, *_ in fragments if "italic" in style)
    plain = "".join(text for style, text, *_ in fragments if "italic" not in style)
    assert dim == "Weighing options.\n" and plain == "Answer."
