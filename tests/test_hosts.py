"""The cluster over several hosts: ranks on their own network stacks (tests/virtual_hosts.py), the
controller and the client on a third, everything between them over TCP. Each front end takes a turn
from the client host; tokens equal one host's; Ctrl-C stops every rank at the same step; a host that
goes away mid-reply gives a clear error while the conversation keeps what was read."""
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import terminal_repl
from virtual_hosts import (
    CONTROLLER_PORTS,
    DAEMON_PORTS,
    MPI_PORTS,
    VirtualHosts,
    unavailable,
)

from llaisys_chat.engine import Engine
from llaisys_chat.generate import generate

BIN = Path(sys.executable).parent
PROMPT = "Write a short poem about message passing."
LONG = "Write a very long, detailed essay about the history of parallel computing."

if (why := unavailable()) is not None:
    pytest.skip(why, allow_module_level=True)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, demo_folder):
    """Two engine hosts of one rank each, and the cluster's controller and client on a third.
    Yields (hosts, the environment of the client host's commands)."""
    with VirtualHosts(engine_hosts=2) as vh, vh.ipcluster(tmp_path_factory.mktemp("ipython"), ranks=2) as env:
        yield vh, env


def on_client(hosts, code: str, timeout: float = 300) -> dict:
    """Run Python code on the client host; it prints one JSON object last, which is returned."""
    vh, env = hosts
    done = subprocess.run(vh.client.command([sys.executable, "-c", textwrap.dedent(code)], env), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_ranks_run_on_their_hosts_and_give_one_host_tokens(hosts, demo_folder):
    got = on_client(hosts, f"""
        import json, socket
        from llaisys_chat import cluster
        c = cluster.connect("demo", quiet=True)
        greedy = c.generate({PROMPT!r}, max_new_tokens=24)
        sampled = c.generate({PROMPT!r}, max_new_tokens=16, temperature=0.8, top_k=20, seed=9)
        print(json.dumps({{"here": socket.gethostname(), "hosts": [r["host"] for r in c.info()["per_rank"]],
                          "greedy": greedy.new_ids, "sampled": sampled.new_ids}}))
    """)
    assert got["here"] == "client" and got["hosts"] == ["node1", "node2"]
    engine = Engine(demo_folder, threads=2)
    assert got["greedy"] == generate(PROMPT, engine=engine, max_new_tokens=24).new_ids
    assert got["sampled"] == generate(PROMPT, engine=engine, max_new_tokens=16, temperature=0.8, top_k=20,
                                      seed=9).new_ids


def test_hosts_connect_only_to_the_ports_the_readme_fixes(hosts):
    """What a firewall between the hosts must let through: every connection between them goes to the
    controller's ports or the daemons' one port on the head node, or to the MPI or daemon ports of an
    engine host (the engines listen on nothing)."""
    vh, _ = hosts
    listening = {vh.client.address: {*CONTROLLER_PORTS, *DAEMON_PORTS}}
    listening.update({node.address: {*MPI_PORTS, *DAEMON_PORTS} for node in vh.nodes})
    seen = [c for node in vh.nodes for c in vh.connections(node)]
    assert {peer for _, _, peer, _ in seen} >= {vh.client.address}
    for address, port, peer, peer_port in seen:
        assert port in listening[address] or peer_port in listening[peer], (address, port, peer, peer_port)


def test_a_repl_turn(hosts):
    vh, env = hosts
    with terminal_repl(on_host=lambda argv, own: vh.client.command(argv, {**env, **{k: own[k] for k in ("TERM", "PROMPT_TOOLKIT_NO_CPR")}})) as child:
        child.expect(">>> ")
        child.sendline("What is the capital of France? Answer in one word.")
        child.expect("Paris")


def test_a_magic_cell(hosts):
    got = on_client(hosts, """
        import json
        from IPython.testing.globalipapp import start_ipython
        from IPython.utils.capture import capture_output
        ip = start_ipython()
        ip.run_line_magic("load_ext", "llaisys_chat")
        with capture_output() as out:
            ip.run_cell_magic("llaisys", "--temperature 0 --max-tokens 20 --out answer",
                              "What is the capital of France? Answer in one word.")
        print(json.dumps({"printed": out.stdout, "text": ip.user_ns["answer"].text}))
    """)
    assert "Paris" in got["text"] and got["printed"].strip() == got["text"].strip()


def test_ctrl_c_stops_every_rank_at_the_same_step(hosts, demo_folder):
    got = on_client(hosts, f"""
        import json, os, signal, threading
        from llaisys_chat import cluster
        c = cluster.connect("demo", quiet=True)
        session = c.session(temperature=0)
        threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            session.send({LONG!r}, max_new_tokens=2000)
        except KeyboardInterrupt:
            pass
        stopped = session.last_reply.stats
        after = c.generate({PROMPT!r}, max_new_tokens=16)
        print(json.dumps({{"finish": stopped.finish_reason, "new": stopped.new_tokens, "after": after.new_ids}}))
    """)
    assert got["finish"] == "interrupted" and 0 < got["new"] < 2000
    # A rank that had left at another step would hold another cache, or wait in a collective forever.
    assert got["after"] == generate(PROMPT, engine=Engine(demo_folder, threads=2), max_new_tokens=16).new_ids


def test_a_host_that_goes_away_mid_reply_is_named_and_the_reply_so_far_kept(hosts):
    """Last in this module: the cluster does not survive it."""
    vh, env = hosts
    code = f"""
        import json, sys
        from llaisys_chat import cluster
        c = cluster.connect("demo", quiet=True)
        session = c.session(temperature=0, max_new_tokens=2000)
        read = []
        try:
            for piece in session.send({LONG!r}, stream=True):
                read.append(piece)
                print(json.dumps({{"piece": piece}}), flush=True)
        except Exception as e:
            print(json.dumps({{"error": f"{{type(e).__name__}}: {{e}}", "kept": session.messages[-1]["content"] == "".join(read),
                              "read": len(read)}}), flush=True)
    """
    child = subprocess.Popen(vh.client.command([sys.executable, "-u", "-c", textwrap.dedent(code)], env),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        pieces, cut_at, last = 0, None, None
        for line in child.stdout:
            last = json.loads(line)
            if "piece" in last:
                pieces += 1
                if pieces == 5:
                    vh.cut(vh.nodes[1])
                    cut_at = time.monotonic()
            else:
                break
        assert cut_at is not None, child.stderr.read()[-3000:]
        assert "error" in last, "the reply went on after the host went away"
        assert time.monotonic() - cut_at < 20
        assert last["error"].startswith("EnginesDown: engine rank 1 on node2 stopped answering the controller")
        assert last["kept"] and last["read"] >= 5
    finally:
        child.kill()
        child.wait()


def test_a_host_without_the_model_gets_its_slice_over_mpi_and_keeps_it(tmp_path, demo_folder):
    """node2 has an empty home: no model files, no cache. It receives only its half of the weights
    from rank 0, keeps them, and new engines load them again without a transfer."""
    generate_on_client = f"""
        import json
        from llaisys_chat import cluster
        c = cluster.connect("demo", quiet=True)
        if RESTART:
            c.restart()  # new engines, which load the model again
        print(json.dumps({{"tokens": c.generate({PROMPT!r}, max_new_tokens=16).new_ids}}))
    """
    with VirtualHosts(engine_hosts=2, without_files=("node2",)) as vh, vh.ipcluster(tmp_path / "ipython", ranks=2) as env:
        first = on_client((vh, env), "RESTART = False\n" + textwrap.dedent(generate_on_client))["tokens"]
        kept = list((vh.home("node2") / ".cache" / "llaisys-chat" / "slices").iterdir())
        assert len(kept) == 1 and (kept[0] / "slices.json").exists()
        held = sum(f.stat().st_size for f in kept[0].glob("*.npy"))
        written = (kept[0] / "slices.json").stat().st_mtime_ns
        again = on_client((vh, env), "RESTART = True\n" + textwrap.dedent(generate_on_client))["tokens"]
        assert list(kept[0].parent.iterdir()) == kept and (kept[0] / "slices.json").stat().st_mtime_ns == written
    gguf = (demo_folder / "model.gguf").resolve().stat().st_size
    assert 0.35 * gguf < held < 0.65 * gguf  # its half, not the whole model
    expected = generate(PROMPT, engine=Engine(demo_folder, threads=2), max_new_tokens=16).new_ids
    assert first == expected and again == expected
