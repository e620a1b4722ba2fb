"""%%llaisys and %llaisys: through an IPython shell, and in a real Jupyter kernel (interrupt included)."""
import pytest
from conftest import iopub_until_idle, shell_reply
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from llaisys_chat.frontends.magic import expand
from llaisys_chat.protocol.messages import reply_markdown


@pytest.fixture(scope="module")
def ip(running_cluster, ipython_shell):
    shell = ipython_shell
    shell.run_line_magic("load_ext", "llaisys_chat")
    shell.run_line_magic("llaisys", "connect")
    yield shell
    shell.magics_manager.registry["LlaisysMagics"].chat.client.close()


def cell(ip, options, body):
    with capture_output() as captured:
        ip.run_cell_magic("llaisys", options, body)
    return captured.stdout


def test_reply_streams_to_the_output_and_lands_in_a_variable(ip):
    printed = cell(ip, "--temperature 0 --max-tokens 40 --out answer", "What is the capital of France? Answer in one word.")
    reply = ip.user_ns["answer"]
    assert "Paris" in reply.text
    assert printed.strip() == reply.text.strip()  # the pieces, in order, make the reply
    cell(ip, "--temperature 0 --max-tokens 10", "Thanks.")
    assert ip.user_ns["_llaisys"].text


def test_variables_expand_like_f_strings(ip):
    ip.user_ns.update(city="Paris", numbers=[1, 2, 3])
    assert expand("About {city}: {len(numbers) + 1} {{braces}} {city!r:>8}", ip.user_global_ns, ip.user_ns) == \
        "About Paris: 4 {braces}  'Paris'"
    cell(ip, "--new --temperature 0 --max-tokens 20", "Which country is {city} in? One word.")
    session = ip.magics_manager.registry["LlaisysMagics"].chat.sessions["default"]
    assert session.messages[0]["content"] == "Which country is Paris in? One word."
    assert "France" in session.messages[1]["content"]


def test_sessions_are_kept_apart(ip):
    cell(ip, "--session alice --temperature 0 --max-tokens 20", "My name is Alice.")
    cell(ip, "--session bob --temperature 0 --max-tokens 20", "My name is Bob.")
    printed = cell(ip, "--session alice --temperature 0 --max-tokens 20", "What is my name?")
    assert "Alice" in printed and "Bob" not in printed
    chat = ip.magics_manager.registry["LlaisysMagics"].chat
    assert len(chat.sessions["alice"].messages) == 4 and len(chat.sessions["bob"].messages) == 2


def test_line_commands(ip, tmp_path):
    cell(ip, "--session notes --system 'Be brief.' --temperature 0 --max-tokens 15", "Say hello.")
    with capture_output() as captured:
        ip.run_line_magic("llaisys", "history --session notes")
        ip.run_line_magic("llaisys", "stats --session notes")
        ip.run_line_magic("llaisys", f"save {tmp_path / 'notes.json'} --session notes")
        ip.run_line_magic("llaisys", "reset --session notes")
        ip.run_line_magic("llaisys", f"load {tmp_path / 'notes.json'} --session copy")
    assert "system: Be brief." in captured.stdout and "user: Say hello." in captured.stdout
    assert "tokens (" in captured.stdout and "Loaded 2 messages" in captured.stdout
    chat = ip.magics_manager.registry["LlaisysMagics"].chat
    assert chat.sessions["notes"].messages == [] and len(chat.sessions["copy"].messages) == 2


@pytest.mark.parametrize("line,body,message", [
    ("--temperature hot", "hi", "argument --temperature: invalid float value"),
    ("--bogus", "hi", "unrecognized arguments: --bogus"),
    ("--session a --new", "hi", "not allowed with argument"),
    ("", "Tell me about {undefined_name}", "cannot expand {undefined_name}: NameError"),
    ("", "   ", "the cell is empty"),
    ("--top-p 3", "hi", "top_p must be in (0, 1]"),
])
def test_bad_options_are_usage_errors(ip, line, body, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ip.run_cell_magic("llaisys", line, body)


def test_bad_line_commands_are_usage_errors(ip):
    with pytest.raises(UsageError):
        ip.run_line_magic("llaisys", "frobnicate")
    with pytest.raises(UsageError, match="cannot read"):
        ip.run_line_magic("llaisys", "load /nonexistent.json")


def test_reasoning_is_folded_in_markdown():
    assert reply_markdown("<think>hmm</think>\n\nYes.").startswith("<details><summary>Reasoning</summary>\n\nhmm")
    assert reply_markdown("opened by the prompt</think>Yes.").endswith("</details>\n\nYes.")
    assert reply_markdown("Plain **markdown**.") == "Plain **markdown**."


def test_interrupting_a_real_kernel_stops_the_reply_and_the_next_cell_works(running_cluster):
    from jupyter_client.manager import start_new_kernel

    manager, kernel = start_new_kernel(kernel_name="python3")
    try:
        run(kernel, "%load_ext llaisys_chat\n%llaisys connect", timeout=120)
        msg_id = kernel.execute("%%llaisys --temperature 0 --max-tokens 2000\n"
                                "Write a very long essay about the history of computing.")
        pieces = []
        while len(pieces) < 10:
            msg = kernel.get_iopub_msg(timeout=120)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                pieces.append(msg["content"]["text"])
        manager.interrupt_kernel()
        reply = shell_reply(kernel, msg_id)
        assert reply["content"]["status"] == "ok"  # no traceback: the magic handled the stop
        outputs = collect(kernel, msg_id)
        assert "[stopped]" in outputs and "text/markdown" in outputs
        followup = run(kernel, "print(_llaisys.stats.finish_reason, len(_llaisys.text) > 0)\n", timeout=60)
        assert "interrupted True" in followup
        followup = run(kernel, "%%llaisys --temperature 0 --max-tokens 30\nSummarise that in one sentence.", timeout=120)
        assert followup.strip()
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=True)


def run(kernel, code: str, timeout: float) -> str:
    """Execute code; return its stream text and displayed Markdown/plain text."""
    msg_id = kernel.execute(code)
    reply = shell_reply(kernel, msg_id, timeout)
    assert reply["content"]["status"] == "ok", reply["content"]
    return collect(kernel, msg_id)


def collect(kernel, msg_id: str) -> str:
    """Everything the cell printed or displayed (Markdown marked as such), until the kernel went idle."""
    out = []
    for kind, content in iopub_until_idle(kernel, msg_id):
        if kind == "stream":
            out.append(content["text"])
        elif kind in ("display_data", "execute_result"):
            data = content["data"]
            out.append(("text/markdown " if "text/markdown" in data else "") + (data.get("text/markdown") or data.get("text/plain", "")))
    return "".join(out)
