"""A rank that dies or stops, in each state, through each front end, on a real cluster: one line says
so within seconds, the conversation keeps everything that was written and read, and the next
message restarts the engines and goes on (tests/test_session.py covers the same on a fake cluster)."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ipyparallel as ipp
import pytest
from conftest import EMPTY_PROMPT, iopub_until_idle, shell_reply, terminal_repl

from llaisys_chat import cluster
from llaisys_chat.client.ranks import process_state
from llaisys_chat.errors import EnginesDown, LlaisysError

LONG = "Write a very long, detailed essay about the history of computing, with many sections."
CHAT = Path(sys.executable).parent / "llaisys-chat"


@pytest.fixture(scope="module")
def client(running_cluster):
    c = cluster.connect("demo", quiet=True)
    yield c
    c.close()


def rank_pid(client, rank: int = 1) -> int:
    return client.info()["per_rank"][rank]["pid"]


def kill_later(pid: int, seconds: float, sig=signal.SIGKILL) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (pid, sig))
    timer.start()
    return timer


def test_between_turns(client):
    chat = client.session(temperature=0, max_new_tokens=24)
    chat.send("My name is Ada. Say hello.")
    os.kill(rank_pid(client), signal.SIGKILL)
    time.sleep(1)
    reply = chat.send("What is my name? One word.")  # restarts the engines first
    assert "Ada" in reply.text and len(chat.messages) == 4


def test_mid_decode(client):
    chat = client.session(temperature=0, max_new_tokens=2000)
    pid, read = rank_pid(client), []
    stream = chat.send(LONG, stream=True)
    started = time.monotonic()
    with pytest.raises(EnginesDown, match=f"engine rank 1 \\(pid {pid}\\) died"):
        for piece in stream:
            read.append(piece)
            if len(read) == 5:
                os.kill(pid, signal.SIGKILL)
                started = time.monotonic()
    assert time.monotonic() - started < 10
    assert chat.messages[-1] == {"role": "assistant", "content": "".join(read)}  # what was read stays
    assert chat.send("Summarise that in five words.", max_new_tokens=20).text
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]


def test_during_prefill(client):
    chat = client.session(temperature=0, max_new_tokens=8)
    timer = kill_later(rank_pid(client), 0.3)
    with pytest.raises(EnginesDown, match="died"):
        chat.send("Repeat the word after me. " + "parallel " * 3000)
    timer.join()
    assert chat.messages[-1]["role"] == "user"  # no reply began: the message waits for /retry
    chat.messages[-1]["content"] = "Say yes."
    assert chat.regenerate().text and [m["role"] for m in chat.messages] == ["user", "assistant"]


def test_while_loading(client):
    timer = kill_later(rank_pid(client), 0.5)
    with pytest.raises(LlaisysError):
        client.load("demo", weights="bf16")
    timer.join()
    client.load("demo")  # restarts, then loads what was asked
    assert client.generate("Say yes.", max_new_tokens=4).text


def test_a_stopped_rank_is_found_and_replaced(client):
    pid = rank_pid(client, 0)
    stream = client.generate(LONG, max_new_tokens=2000, stream=True)
    with pytest.raises(EnginesDown, match=f"engine rank 0 \\(pid {pid}\\) is stopped"):
        for i, _ in enumerate(stream):
            if i == 3:
                os.kill(pid, signal.SIGSTOP)
    assert client.generate("Say yes.", max_new_tokens=4).text
    assert rank_pid(client, 0) != pid


def test_repl_says_so_in_one_line_and_carries_on(client, running_cluster):
    pid = rank_pid(client)  # now: asked during a reply, it would wait for the reply to end
    with terminal_repl() as child:
        child.expect(">>> ")
        child.sendline("My name is Ada. Say hello in one short sentence.")
        child.expect(EMPTY_PROMPT)  # the reply has ended
        child.sendline(LONG)
        child.expect_exact(LONG)  # the echo; then the reply's first words
        child.expect(r"\w+ \w+ \w+")
        time.sleep(1.0)  # well into the 600-token reply
        os.kill(pid, signal.SIGKILL)
        child.expect(r"error: engine rank [^\n]*\(pid \d+\) died", timeout=10)
        child.expect(EMPTY_PROMPT)
        child.sendline("What is my name? One word.")
        child.expect("restarting the engines")
        child.expect(EMPTY_PROMPT)
        child.sendline("/history")
        # Asserted through the history: the model's answer depends on where the essay was cut.
        child.expect("user: My name is Ada")
        child.expect(re.escape(f"user: {LONG}") + r"\s+assistant: \S")
        child.expect(r"user: What is my name\? One word\.\s+assistant: \S")


def test_magic_says_so_and_the_next_cell_carries_on(client, ipython_shell):
    from IPython.core.error import UsageError
    from IPython.utils.capture import capture_output

    ip = ipython_shell
    ip.run_line_magic("load_ext", "llaisys_chat")
    with capture_output():
        ip.run_line_magic("llaisys", "connect")
        ip.run_cell_magic("llaisys", "--temperature 0 --max-tokens 30", "My name is Ada. Say hello.")
    timer = kill_later(rank_pid(client), 2.0)
    with capture_output(), pytest.raises(UsageError, match="died"):
        ip.run_cell_magic("llaisys", "--temperature 0 --max-tokens 2000", LONG)
    timer.join()
    with capture_output() as out:
        ip.run_cell_magic("llaisys", "--temperature 0 --max-tokens 20", "What is my name? One word.")
        ip.run_line_magic("llaisys", "history")
    assert "user: My name is Ada" in out.stdout and "user: What is my name?" in out.stdout
    ip.magics_manager.registry["LlaisysMagics"].chat.client.close()


def test_kernel_says_so_and_the_next_cell_carries_on(client, tmp_path):
    from jupyter_client.manager import start_new_kernel

    prefix = tmp_path / "jupyter"
    subprocess.run([CHAT, "kernel", "install", "--prefix", prefix], check=True, capture_output=True)
    os.environ["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
    manager, kernel = start_new_kernel(kernel_name="llaisys-chat")
    try:
        def run(code):
            msg_id = kernel.execute(code)
            reply = shell_reply(kernel, msg_id, 300)["content"]
            return reply, iopub_until_idle(kernel, msg_id, 300)

        run("/set temperature 0\n/set max_tokens 2000\nMy name is Ada. Say hello.")
        timer = kill_later(rank_pid(client), 3.0)
        reply, _ = run(LONG)
        timer.join()
        assert reply["status"] == "error" and "died" in reply["evalue"] and "\n" not in reply["evalue"]
        reply, messages = run("/set max_tokens 20\nWhat is my name? One word.")
        assert reply["status"] == "ok"
        assert "".join(c["data"]["text/plain"] for k, c in messages if k == "execute_result").strip()
        _, messages = run("/history")  # (the model's answer depends on where the essay was cut)
        history = "".join(c["text"] for k, c in messages if k == "stream")
        assert "user: My name is Ada" in history and "user: What is my name?" in history
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=True)
        del os.environ["JUPYTER_PATH"]


def test_a_cluster_the_client_started_recovers_too(tmp_path, monkeypatch):
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    own = cluster.connect("demo", n=2, cluster_id="recovering", quiet=True)
    try:
        os.kill(rank_pid(own), signal.SIGKILL)
        time.sleep(1)
        assert own.generate("Say yes.", max_new_tokens=4).text
    finally:
        own.close()


def test_a_dead_controller_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    try:
        own = cluster.connect("demo", n=2, cluster_id="headless", quiet=True)
        pid = ipp.Cluster.from_file(profile="default", cluster_id="headless").controller.pid
        os.kill(pid, signal.SIGKILL)
        # SIGKILL ends a process shortly after, not at once: on a loaded machine the request below once
        # went out (and was served by the dead controller's surviving schedulers) while it still ran.
        gone_by = time.monotonic() + 10
        while process_state(pid) is not None and time.monotonic() < gone_by:
            time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(EnginesDown, match="controller .* died.*connect again"):
            own.generate("Say yes.", max_new_tokens=4)
        assert time.monotonic() - started < 10
        own.close()
    finally:
        kill_processes_of(tmp_path)  # the dead controller's schedulers outlive it


def test_a_cluster_file_left_by_a_crash_starts_a_new_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    crash = "from llaisys_chat import cluster; import os; cluster.connect(None, n=2, cluster_id='crashed', quiet=True); os._exit(0)"
    subprocess.run([sys.executable, "-c", crash], check=True, timeout=300)
    kill_processes_of(tmp_path)  # the cluster dies after its owner: its file stays behind
    # Its controller's pid, as once the killed process has been reaped (here no init may reap it soon).
    file = tmp_path / "profile_default" / "security" / "cluster-crashed.json"
    state = json.loads(file.read_text())
    ended = subprocess.Popen(["true"])
    ended.wait()
    state["controller"]["state"]["pid"] = ended.pid
    file.write_text(json.dumps(state))
    own = cluster.connect("demo", n=2, cluster_id="crashed", quiet=True)
    try:
        assert own.generate("Say yes.", max_new_tokens=4).text
    finally:
        own.close()
        kill_processes_of(tmp_path)


def kill_processes_of(ipython_dir) -> None:
    """Kill what is left of a cluster: every process started with IPYTHONDIR=ipython_dir."""
    mark = f"IPYTHONDIR={ipython_dir}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            pass
