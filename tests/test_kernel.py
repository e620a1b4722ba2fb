"""The LLAISYS chat kernel, installed as a kernel spec and driven by jupyter_client on a real cluster."""
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from conftest import iopub_until_idle, shell_reply
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

CHAT = Path(sys.executable).parent / "llaisys-chat"
NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "chat_kernel.ipynb"


@pytest.fixture(scope="module")
def kernel_spec(running_cluster, tmp_path_factory):
    """The kernel spec installed under a temporary prefix that Jupyter is pointed at."""
    prefix = tmp_path_factory.mktemp("jupyter")
    result = subprocess.run([CHAT, "kernel", "install", "--prefix", prefix], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    previous = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
    listed = subprocess.run([Path(sys.executable).parent / "jupyter", "kernelspec", "list"], capture_output=True, text=True)
    assert "llaisys-chat" in listed.stdout
    yield "llaisys-chat"
    if previous is None:
        os.environ.pop("JUPYTER_PATH")
    else:
        os.environ["JUPYTER_PATH"] = previous


@pytest.fixture(scope="module")
def kernel(kernel_spec):
    manager = KernelManager(kernel_name=kernel_spec)
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    yield manager, client
    client.stop_channels()
    manager.shutdown_kernel(now=True)


def execute(client, code: str, timeout: float = 300):
    """(reply content, list of (msg_type, content) published for it until idle)."""
    msg_id = client.execute(code)
    reply = shell_reply(client, msg_id, timeout)
    return reply["content"], iopub_until_idle(client, msg_id)


def result_text(messages) -> str:
    return "".join(c["data"]["text/plain"] for kind, c in messages if kind == "execute_result")


def test_kernel_info_completion_and_is_complete(kernel):
    _, client = kernel
    info = shell_reply(client, client.kernel_info())["content"]
    assert info["language_info"]["name"] == "markdown" and info["implementation"] == "llaisys-chat"
    assert shell_reply(client, client.complete("/se", 3))["content"]["matches"] == ["/set"]
    assert shell_reply(client, client.complete("/set top", 8))["content"]["matches"] == ["top_k", "top_p"]
    assert shell_reply(client, client.is_complete("anything at all"))["content"]["status"] == "complete"


def test_two_turns_stream_and_remember(kernel):
    _, client = kernel
    reply, messages = execute(client, "/set temperature 0\n/set max_tokens 40")
    assert reply["status"] == "ok"
    assert "temperature = 0.0" in "".join(c["text"] for k, c in messages if k == "stream")
    reply, messages = execute(client, "My name is Ada. Please remember it.")
    streams = [c["text"] for kind, c in messages if kind == "stream"]
    assert reply["status"] == "ok" and len(streams) > 3  # the reply arrived in pieces...
    kinds = [kind for kind, _ in messages]
    assert kinds.index("execute_result") > kinds.index("stream")  # ...before the finished Markdown
    assert result_text(messages) == "".join(streams)
    count = reply["execution_count"]
    reply, messages = execute(client, "What is my name?")
    assert "Ada" in result_text(messages) and reply["execution_count"] == count + 1


def test_bad_command_is_a_one_line_error(kernel):
    _, client = kernel
    reply, messages = execute(client, "/frobnicate")
    assert reply["status"] == "error" and reply["traceback"] == ["error: unknown command /frobnicate; /help lists them"]
    reply, _ = execute(client, "/set temperature 0")
    assert reply["status"] == "ok"  # the kernel lives on


def test_interrupt_keeps_the_partial_reply_and_the_next_turn_works(kernel):
    manager, client = kernel
    execute(client, "/set max_tokens 2000")
    msg_id = client.execute("Write a very long essay about the history of computing.")
    pieces = 0
    while pieces < 10:
        msg = client.get_iopub_msg(timeout=120)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            pieces += 1
    manager.interrupt_kernel()
    reply = shell_reply(client, msg_id)["content"]
    assert reply["status"] == "ok"
    messages = iopub_until_idle(client, msg_id)
    markdown = "".join(c["data"]["text/markdown"] for k, c in messages if k == "execute_result")
    assert "[stopped]" in markdown
    execute(client, "/set max_tokens 40")
    reply, messages = execute(client, "Summarise what you wrote in one sentence.")
    assert reply["status"] == "ok" and result_text(messages).strip()


def test_restart_reconnects_without_reloading(kernel):
    manager, client = kernel
    manager.restart_kernel(now=True)
    client.wait_for_ready(timeout=60)
    started = time.monotonic()
    reply, messages = execute(client, "/show")
    printed = "".join(c.get("text", "") for _, c in messages)
    assert reply["status"] == "ok" and "Ranks: 2" in printed
    assert "loading" not in printed  # a (re)load announces itself; finding the model loaded does not
    assert time.monotonic() - started < 10


def test_notebook_for_the_kernel_runs(kernel_spec, tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name=kernel_spec, resources={"metadata": {"path": str(tmp_path)}}).execute()
    chat_cells = [c for c in notebook.cells if c.cell_type == "code" and not c.source.startswith("/")]
    for cell in chat_cells:
        assert any(o["output_type"] == "execute_result" and o["data"]["text/plain"].strip() for o in cell.outputs)
