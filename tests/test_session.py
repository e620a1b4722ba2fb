"""Conversations (client/session.py) through the real client, reply stream, stream link and engine
worker, over a fake cluster: no MPI and no model, so these run in seconds."""
import pytest
from fake_cluster import fake_cluster

from llaisys_chat.errors import EnginesDown, LlaisysError
from llaisys_chat.frontends.streaming import context_notice, stream_reply

LONG = " ".join(f"w{i}" for i in range(300))


@pytest.fixture
def cluster(tmp_path):
    client, rank = fake_cluster(tmp_path, reply_for=lambda prompt: "Hi there, friend.")
    yield client, rank
    client.close()


def test_a_reply_streams_in_pieces_that_make_it_and_joins_the_conversation(cluster):
    client, rank = cluster
    session = client.session(system="Be kind.")
    pieces = list(session.send("Hello?", stream=True))
    assert pieces == ["Hi", " there,", " friend."]
    assert session.last_reply.text == "Hi there, friend." and session.last_reply.stats.finish_reason == "stop"
    assert session.messages == [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi there, friend."}]
    assert rank.engine.prompts[-1] == "[system] Be kind.\n[user] Hello?\n[assistant] "


def test_the_model_sees_earlier_replies_without_their_reasoning(tmp_path):
    client, rank = fake_cluster(tmp_path, reply_for=lambda prompt: "<think>Easy.</think> Four.")
    session = client.session()
    session.send("2 + 2?")
    session.send("And 3 + 3?")
    assert session.messages[1]["content"] == "<think>Easy.</think> Four."
    assert rank.engine.prompts[-1] == "[user] 2 + 2?\n[assistant] Four.\n[user] And 3 + 3?\n[assistant] "
    client.close()


def test_settings_are_checked_when_set_and_reach_the_engine(cluster):
    client, rank = cluster
    session = client.session(temperature=0.3, max_new_tokens=7)
    with pytest.raises(LlaisysError, match="top_p must be in"):
        session.set(top_p=0)
    with pytest.raises(LlaisysError, match="unknown setting 'warmth'"):
        session.set(warmth=1)
    session.send("Hi", top_k=3)
    request = rank.engine.requests[-1]
    assert request["params"].temperature == 0.3 and request["params"].top_k == 3 and request["max_new_tokens"] == 7
    assert request["cache_key"] == session.key and session.sampling["top_p"] == 0.8  # Qwen's chat default


def test_stop_mid_reply_keeps_the_text_so_far(tmp_path):
    client, rank = fake_cluster(tmp_path, reply_for=lambda prompt: LONG, step_seconds=0.01)
    session = client.session()
    stream = session.send("Talk.", stream=True)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) == 5:
            stream.stop()
    assert 5 <= len(pieces) < 300
    assert session.last_reply.stats.finish_reason == "interrupted"
    assert session.messages[-1]["content"] == "".join(pieces)
    assert rank.interrupts == 0  # rank 0 heard the stop over the link, not by signal
    assert session.send("Again.").text == LONG  # the next turn runs in full
    client.close()


def test_ctrl_c_while_showing_a_piece_stops_the_reply_on_the_ranks(tmp_path):
    client, rank = fake_cluster(tmp_path, reply_for=lambda prompt: LONG, step_seconds=0.01)
    session = client.session()
    stream = session.send("Talk.", stream=True)
    shown = []

    def show(piece):
        shown.append(piece)
        if len(shown) == 3:
            raise KeyboardInterrupt

    assert stream_reply(stream, show) is True
    assert stream.reply.stats.finish_reason == "interrupted" and len(stream.reply.new_ids) < 300
    assert session.messages[-1]["content"] == stream.reply.text and stream.reply.text.startswith("".join(shown))
    client.close()


def test_a_reply_that_fails_leaves_the_conversation_as_it_was(cluster):
    client, rank = cluster
    session = client.session()
    session.send("First.")
    rank.engine.fail_with = RuntimeError("the engine broke")
    with pytest.raises(LlaisysError, match="rank 0: the engine broke"):
        session.send("Second.")
    assert [m["content"] for m in session.messages] == ["First.", "Hi there, friend."]
    rank.engine.fail_with = RuntimeError("again")
    with pytest.raises(LlaisysError):
        session.regenerate()
    assert session.messages[-1]["content"] == "Hi there, friend."  # the old reply is kept


def test_undo_regenerate_and_reset(cluster):
    client, _ = cluster
    session = client.session()
    with pytest.raises(LlaisysError, match="no reply to regenerate"):
        session.regenerate()
    session.send("One.")
    session.send("Two.")
    assert session.undo() == "Two." and len(session.messages) == 2
    session.regenerate()
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    session.reset()
    assert session.messages == [] and session.last_reply is None and session.undo() is None


def test_saved_conversations_load_back_and_bad_ones_change_nothing(cluster, tmp_path):
    client, _ = cluster
    session = client.session(system="Terse.", seed=4)
    session.send("Hi")
    path = session.save(tmp_path / "chat.json")
    other = client.session()
    other.load(path)
    assert (other.system, other.messages, other.sampling) == (session.system, session.messages, session.sampling)
    for bad, error in [({"version": 99}, "version 1 expected"),
                       ({**session.state(), "messages": [{"role": "wizard", "content": "x"}]}, "role 'wizard'"),
                       ({**session.state(), "sampling": {"top_k": -1}}, "top_k must be")]:
        with pytest.raises(LlaisysError, match=error):
            other.restore(bad)
        assert other.state() == session.state()
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(LlaisysError, match="not a saved conversation"):
        other.load(tmp_path / "broken.json")


def test_client_generate_without_a_session(cluster):
    client, rank = cluster
    reply = client.generate("Hi", system="S", max_new_tokens=2, stop="x")
    assert reply.text == "Hi there," and reply.stats.finish_reason == "length"
    assert rank.engine.requests[-1]["stop"] == ("x",) and rank.engine.requests[-1]["cache_key"] == "default"
    client.drop_session("default")
    assert rank.engine.dropped == ["default"]


def test_an_engine_that_dies_mid_reply_loses_nothing_and_the_next_turn_restarts_it(tmp_path):
    client, rank = fake_cluster(tmp_path, reply_for=lambda prompt: LONG, step_seconds=0.01)
    session = client.session()
    session.send("First.", max_new_tokens=3)
    stream = session.send("Talk.", stream=True)
    read = []
    with pytest.raises(EnginesDown, match=r"rank 1 \(pid 42\) died"):
        for piece in stream:
            read.append(piece)
            if len(read) == 4:
                rank.die("engine rank 1 (pid 42) died")
    assert [m["content"] for m in session.messages] == ["First.", "w0 w1 w2", "Talk.", "".join(read)]
    assert session.last_reply.stats.finish_reason == "error"
    assert session.send("Go on.", max_new_tokens=2).text == "w0 w1"  # restarted by itself
    assert rank.restarts == 1 and len(session.messages) == 6


def test_a_message_sent_while_the_engines_are_down_stays_for_retry(tmp_path):
    client, rank = fake_cluster(tmp_path, reply_for=lambda prompt: "Back again.")
    session = client.session()
    rank.die("engine rank 0 (pid 7) is stopped")
    rank.restart = lambda: (_ for _ in ()).throw(LlaisysError("could not restart the engines (no launcher)"))
    with pytest.raises(LlaisysError, match="could not restart"):
        session.send("Are you there?")
    assert session.messages == [{"role": "user", "content": "Are you there?"}]
    del rank.restart  # the fake's own restart works again
    assert session.regenerate().text == "Back again."
    assert [m["role"] for m in session.messages] == ["user", "assistant"]


def test_a_conversation_longer_than_the_context_lets_its_oldest_messages_go(tmp_path):
    client, rank = fake_cluster(tmp_path, reply_for=lambda prompt: "one two three four five six")
    rank.engine.max_context = 60  # words
    session = client.session(system="Keep this rule.", max_new_tokens=6)
    for i in range(8):
        session.send(f"message number {i} " + "padding " * 4)
    reply = session.last_reply
    assert reply.stats.dropped_messages > 0 and reply.stats.max_context == 60
    assert context_notice(reply) == f"(dropped {reply.stats.dropped_messages} earlier messages to fit the 60-token context)"
    prompt = rank.engine.prompts[-1]
    assert prompt.startswith("[system] Keep this rule.\n[user] message number")  # the system prompt stays, a user turn leads
    assert "message number 7" in prompt and "message number 0" not in prompt
    assert len(prompt.split()) <= 60 - 6
    assert len(session.messages) == 16  # the conversation itself keeps everything
    session.set(context="error")
    with pytest.raises(LlaisysError, match="the conversation is .* tokens but the context holds 60 .*context trim"):
        session.send("one more " * 10)
    assert len(session.messages) == 16
