"""The cluster API against a real `ipcluster start --engines=MPI -n 2` and the real demo model."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ipcluster

from llaisys_chat import cluster
from llaisys_chat.engine import Engine
from llaisys_chat.errors import LlaisysError
from llaisys_chat.generate import generate

PROMPT = "Write a short poem about message passing."
LONG = "Write a very long, detailed essay about the history of parallel computing."


@pytest.fixture(scope="module")
def chat(demo_client):
    return demo_client


def test_engines_are_the_ranks_and_hold_half_the_model(chat, demo_folder):
    info = chat.info()
    assert info["ranks"] == 2 and info["max_context"] == 8192
    shards = [r["shard"] for r in info["per_rank"]]
    assert shards[0]["head_end"] == shards[1]["head_begin"] == 7
    single = Engine(demo_folder, threads=1).model.weight_bytes
    assert all(r["weight_bytes"] < 0.55 * single for r in info["per_rank"])


def test_generate_equals_the_single_process_engine(chat, demo_folder):
    expected = generate(PROMPT, engine=Engine(demo_folder, threads=2), max_new_tokens=40)
    reply = chat.generate(PROMPT, max_new_tokens=40)
    assert reply.new_ids == expected.new_ids and reply.text == expected.text
    assert reply.stats.decode_tokens_per_s > 0 and reply.stats.first_token_seconds > 0
    sampled = [chat.generate(PROMPT, max_new_tokens=20, temperature=0.8, top_k=20, seed=9).new_ids for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_generate_many_decodes_together_and_equals_each_alone(chat):
    prompts = ["Name a prime number.", [{"role": "user", "content": "What is MPI?"}], "Say hi in French."]
    alone = [chat.generate(p, max_new_tokens=24, temperature=0.7, seed=3) for p in prompts]
    together = chat.generate_many(prompts, max_new_tokens=24, temperature=0.7, seed=3)
    assert [r.new_ids for r in together] == [r.new_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    with pytest.raises(LlaisysError, match="context holds"):
        chat.generate_many(["fine", "x " * 9000], max_new_tokens=4, context="error")


def test_streaming_yields_the_blocking_text_in_order(chat):
    blocking = chat.generate(PROMPT, max_new_tokens=60)
    stream = chat.generate(PROMPT, max_new_tokens=60, stream=True)
    pieces = list(stream)
    assert len(pieces) > 10
    assert "".join(pieces) == blocking.text == stream.reply.text
    assert sorted(stream.delays)[len(stream.delays) // 2] < 0.05


def test_streamed_multi_byte_text_arrives_whole(chat):
    prompt = "用中文写两句关于并行计算的话，并在结尾加上一个表情符号。"
    blocking = chat.generate(prompt, max_new_tokens=60)
    pieces = list(chat.generate(prompt, max_new_tokens=60, stream=True))
    assert "".join(pieces) == blocking.text
    assert any("\u4e00" <= ch <= "\u9fff" for ch in blocking.text) and "\ufffd" not in blocking.text


def test_a_tiny_model_on_the_cluster_equals_the_single_process_engine(chat, tiny_models):
    folder = tiny_models(layers=2, hidden=32, heads=4, kv_heads=2, ffn=256)
    try:
        chat.load(str(folder))
        for sampling in (dict(temperature=0.0), dict(temperature=0.9, top_k=10, seed=4)):
            expected = generate("cluster", engine=Engine(folder), max_new_tokens=16, **sampling).new_ids
            assert chat.generate("cluster", max_new_tokens=16, **sampling).new_ids == expected
    finally:
        chat.load("demo")


def test_stop_mid_reply_keeps_the_partial_reply_and_the_next_turn_works(chat):
    session = chat.session(temperature=0)
    stream = session.send(LONG, stream=True, max_new_tokens=400)
    received = ""
    for i, piece in enumerate(stream):
        received += piece
        if i == 15:
            stream.stop()
    assert stream.reply.stats.finish_reason == "interrupted"
    assert 15 <= stream.reply.stats.new_tokens < 60
    assert session.messages[-1] == {"role": "assistant", "content": stream.reply.text}
    assert received == stream.reply.text
    follow_up = session.send("Summarise that in one sentence.", max_new_tokens=30)
    assert follow_up.text and follow_up.stats.cached_tokens > 0
    # Every rank left the stopped reply at the same step: a fresh greedy reply matches the engine.
    assert chat.generate(PROMPT, max_new_tokens=12).new_ids == chat.generate(PROMPT, max_new_tokens=12).new_ids


def test_ctrl_c_in_the_client_stops_every_rank(chat):
    session = chat.session(temperature=0)
    timer = threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT))  # well into the reply, even on a busy machine
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        session.send(LONG, max_new_tokens=2000)
    assert time.monotonic() - started < 13
    assert session.messages[-1]["role"] == "assistant" and session.last_reply.stats.finish_reason == "interrupted"
    assert session.send("Thanks!", max_new_tokens=10).text


def test_stop_strings_and_max_tokens_end_replies(chat):
    counted = chat.generate("Count from 1 to 20, separated by commas.", max_new_tokens=80)
    assert "5" in counted.text
    stopped = chat.generate("Count from 1 to 20, separated by commas.", max_new_tokens=80, stop=", 5")
    assert stopped.text == counted.text[: counted.text.index(", 5")] and stopped.stats.finish_reason == "stop"
    short = chat.generate(LONG, max_new_tokens=7)
    assert short.stats.new_tokens == 7 and short.stats.finish_reason == "length"


def test_two_sessions_keep_separate_histories(chat):
    alice, bob = chat.session(temperature=0), chat.session(temperature=0)
    alice.send("My name is Alice. Remember it.", max_new_tokens=20)
    bob.send("My name is Bob. Remember it.", max_new_tokens=20)
    assert "Alice" in alice.send("What is my name?", max_new_tokens=20).text
    assert "Bob" in bob.send("What is my name?", max_new_tokens=20).text
    assert len(alice.messages) == len(bob.messages) == 4
    assert all("Bob" not in m["content"] for m in alice.messages if m["role"] == "user")


def test_session_undo_regenerate_save_and_load(chat, tmp_path):
    session = chat.session(system="You are terse.", temperature=0)
    first = session.send("Name a prime number.", max_new_tokens=10).text
    again = session.regenerate(max_new_tokens=10).text
    assert again == first and len(session.messages) == 2
    path = session.save(tmp_path / "chat.json")
    restored = chat.session()
    restored.load(path)
    assert restored.messages == session.messages and restored.system == "You are terse."
    assert restored.sampling == session.sampling
    kept = list(session.messages)
    with pytest.raises(LlaisysError, match="temperature"):
        session.regenerate(temperature=-1)  # a failed retry leaves the conversation as it was
    assert session.messages == kept
    assert session.undo() == "Name a prime number." and session.messages == []
    with pytest.raises(LlaisysError, match="not a saved conversation"):
        (tmp_path / "bad.json").write_text("[1, 2]")
        restored.load(tmp_path / "bad.json")


def test_user_errors_come_back_as_one_line(chat):
    with pytest.raises(LlaisysError, match="the context holds 8192"):
        chat.generate("word " * 9000, max_new_tokens=5)
    with pytest.raises(LlaisysError, match="temperature"):
        chat.generate("hi", temperature=-1)
    assert chat.generate("hi", max_new_tokens=3).text  # the engines are fine afterwards


def test_concurrent_clients_each_get_their_own_reply_in_turn(chat):
    """Three client processes at once, four replies each: every rank runs their calls in one order."""
    prompts = ["Name a prime number.", "Name a colour.", "Name a planet."]
    solo = {p: chat.generate(p, max_new_tokens=20).new_ids for p in prompts}
    code = ("import json, sys\nfrom llaisys_chat import cluster\n"
            "c = cluster.connect('demo', quiet=True)\n"
            "print(json.dumps([c.generate(sys.argv[1], max_new_tokens=20).new_ids for _ in range(4)]))\nc.close()\n")
    clients = [subprocess.Popen([sys.executable, "-c", code, p], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for p in prompts]
    for prompt, client in zip(prompts, clients):
        out, err = client.communicate(timeout=600)
        assert client.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1]) == [solo[prompt]] * 4, prompt


def test_reconnect_reuses_the_loaded_model(chat):
    started = time.monotonic()
    second = cluster.connect("demo", quiet=True)
    try:
        assert time.monotonic() - started < 5
        assert second.generate(PROMPT, max_new_tokens=8).new_ids == chat.generate(PROMPT, max_new_tokens=8).new_ids
    finally:
        second.close()


def test_a_killed_engine_gives_an_error_then_restart_recovers(chat):
    """Last in this module: it kills rank 1 mid-reply."""
    pid = chat.info()["per_rank"][1]["pid"]
    stream = chat.generate(LONG, max_new_tokens=2000, stream=True)
    started = time.monotonic()
    with pytest.raises(LlaisysError, match="died"):
        for i, _ in enumerate(stream):
            if i == 5:
                os.kill(pid, signal.SIGKILL)
    assert time.monotonic() - started < 15
    chat.restart()
    assert chat.generate(PROMPT, max_new_tokens=8).text


def test_a_rank_that_raises_mid_reply_gives_an_error_at_once(chat):
    """Rank 1 fails while rank 0 waits for it in a collective: the client must not wait too."""
    code = ("from mpi4py import MPI\n"
            "from llaisys_chat.engine import worker\n"
            "if MPI.COMM_WORLD.Get_rank() == 1:\n"
            "    worker.loaded_engine().model = None\n")
    chat.run_on_ranks(exec, code)
    started = time.monotonic()
    with pytest.raises(LlaisysError, match="rank 1: engine error: AttributeError"):
        chat.generate(PROMPT, max_new_tokens=20)
    assert time.monotonic() - started < 10
    chat.restart()
    assert chat.generate(PROMPT, max_new_tokens=8).text


def test_engines_that_are_not_mpi_ranks_are_refused(tmp_path):
    with ipcluster(tmp_path, n=2, engines="local"):
        with pytest.raises(LlaisysError, match="not the ranks of one MPI communicator"):
            cluster.connect("demo", quiet=True)
