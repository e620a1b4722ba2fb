"""The engine worker (engine/worker.py) with a scripted engine: loading, streaming, stopping."""
import pytest
from fake_cluster import ScriptedEngine

from llaisys_chat.client.stream_link import StreamLink
from llaisys_chat.engine.worker import Worker
from llaisys_chat.errors import LlaisysError
from llaisys_chat.protocol.request import ReplyRequest

MESSAGES = [{"role": "user", "content": "Hi"}]


def worker_with(engine: ScriptedEngine) -> Worker:
    return Worker(make_engine=lambda model, **options: engine)


def test_a_spec_loads_once():
    loads = []
    worker = Worker(make_engine=lambda model, **options: loads.append((model, options)) or ScriptedEngine())
    with pytest.raises(LlaisysError, match="no model is loaded"):
        worker.info()
    assert worker.load({"model": "m", "threads": 1})["loaded_now"]
    assert not worker.load({"model": "m", "threads": 1})["loaded_now"]
    assert worker.load({"model": "m", "threads": 2})["loaded_now"]
    assert loads == [("m", {"threads": 1}), ("m", {"threads": 2})] and worker.spec == {"model": "m", "threads": 2}


def test_rank0_streams_every_piece_then_says_done():
    link = StreamLink(local=True)
    worker = worker_with(ScriptedEngine(lambda prompt: "one two three"))
    worker.load({"model": "m"})
    reply = worker.generate(ReplyRequest(MESSAGES, stream_to=link.address, stream_token=link.token, id="r1"))
    link.wait_for_rank0(5, check=lambda: None)
    messages = link.receive(1)
    assert [m.get("text") for m in messages] == ["one", " two", " three", None] and messages[-1]["done"]
    assert reply.text == "one two three" and reply.new_ids == [3, 3, 5] and reply.prompt_ids
    link.close()


def test_a_template_that_opens_reasoning_shows_its_tag():
    engine = ScriptedEngine(lambda prompt: "hmm </think> Yes.")
    engine.chat.render = lambda messages: "[assistant] <think>\n"
    worker = worker_with(engine)
    worker.load({"model": "m"})
    link = StreamLink(local=True)
    reply = worker.generate(ReplyRequest(MESSAGES, stream_to=link.address, stream_token=link.token))
    link.wait_for_rank0(5, check=lambda: None)
    assert link.receive(1)[0]["text"] == "<think>hmm"
    assert reply.text == "<think>hmm </think> Yes."
    link.close()


def test_an_unreachable_client_stops_the_reply_at_its_first_step():
    worker = worker_with(ScriptedEngine(lambda prompt: "never said"))
    worker.load({"model": "m"})
    reply = worker.generate(ReplyRequest(MESSAGES, stream_to="unix:/nonexistent/llaisys.sock"))
    assert reply.text == "" and reply.stats.finish_reason == "interrupted"


def test_a_stop_request_before_a_step_ends_the_reply_there():
    engine = ScriptedEngine(lambda prompt: "a b c d e f")
    worker = worker_with(engine)
    worker.load({"model": "m"})
    link = StreamLink(local=True)
    steps = []

    def stop_after_two(prompt_ids, params, **kwargs):
        should_stop = kwargs["should_stop"]

        def counting():
            steps.append(1)
            if len(steps) == 3:
                worker.request_stop()  # what SIGINT / SIGUSR1 do on a rank
            return should_stop()
        return ScriptedEngine.generate(engine, prompt_ids, params, **{**kwargs, "should_stop": counting})

    engine.generate = stop_after_two
    reply = worker.generate(ReplyRequest(MESSAGES, stream_to=link.address, stream_token=link.token))
    assert reply.text == "a b" and reply.stats.finish_reason == "interrupted"
    link.close()
