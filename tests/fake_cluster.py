"""A small fake cluster for the fast unit layer: one in-process "rank" running the real engine
worker (engine/worker.py) in a thread, over the real stream link, with a scripted engine instead of
a model. Everything above the engine is the real code: Cluster, ReplyStream, StreamLink, Session.
"""
import threading
import time
from pathlib import Path

from llaisys_chat.cluster import Cluster
from llaisys_chat.engine import Engine
from llaisys_chat.engine.collectives import SingleProcess
from llaisys_chat.engine.worker import Worker
from llaisys_chat.errors import EnginesDown, LlaisysError
from llaisys_chat.protocol.reply import GenerationStats


class ScriptedChat:
    """The chat format of a model whose tokens are words: prompts render as plain text."""

    def render(self, messages: list[dict]) -> str:
        return "".join(f"[{m['role']}] {m['content']}\n" for m in messages) + "[assistant] "

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


class ScriptedEngine:
    """Engine's interface: each reply is `reply_for(messages)` word by word, one word per step,
    `step_seconds` apart; the stop check runs before every step, as the real engine's does."""

    fit = Engine.fit  # the real engine's choice of messages and start of a reply, on words as tokens
    reply = Engine.reply

    def __init__(self, reply_for=None, step_seconds: float = 0.0, max_context: int = 128):
        self.group = SingleProcess()
        self.max_context = max_context
        self.chat = ScriptedChat()
        self.reply_for = reply_for or (lambda prompt: "Hello from the fake engine.")
        self.step_seconds = step_seconds
        self.prompts: list[str] = []   # every prompt it was asked to answer
        self.requests: list[dict] = []  # how each reply was asked for
        self.dropped: list[str] = []   # caches it was asked to forget
        self.fail_with: Exception | None = None  # raised by the next generate()
        self.frozen = threading.Event()  # while set, a reply makes no progress (a dead or stopped rank)

    def generate(self, prompt_ids, params, *, max_new_tokens, stop, cache_key, should_stop):
        self.requests.append({"params": params, "max_new_tokens": max_new_tokens, "stop": stop, "cache_key": cache_key})
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        return ScriptedGeneration(self, prompt_ids, max_new_tokens, should_stop)

    def info(self) -> dict:
        return {"model": "scripted", "rank": 0, "ranks": 1, "threads": 1, "weights": "bf16", "max_context": self.max_context,
                "shard": {}, "weight_bytes": 0, "cache_bytes": 0, "cache_slots": 4, "rss_bytes": 0}

    def drop_cache(self, key: str) -> None:
        self.dropped.append(key)


class ScriptedGeneration:
    """A Generation's interface: iterate for (token, piece); `tokens`, `text` and `stats` fill in."""

    def __init__(self, engine: ScriptedEngine, prompt_ids, max_new_tokens, should_stop):
        self.engine, self.max_new_tokens, self.should_stop = engine, max_new_tokens, should_stop
        self.prompt_ids, self.prompt = list(prompt_ids), ""
        self.tokens: list[int] = []
        self.text = ""
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))

    def __iter__(self):
        words = self.engine.reply_for(self.engine.prompts[-1] if self.engine.prompts else "").split(" ")
        self.stats.finish_reason = "stop"
        for i, word in enumerate(words):
            while self.engine.frozen.is_set():
                time.sleep(0.005)
            if self.should_stop():
                self.stats.finish_reason = "interrupted"
                return
            if i == self.max_new_tokens:
                self.stats.finish_reason = "length"
                return
            time.sleep(self.engine.step_seconds)
            piece = word if i == 0 else " " + word
            self.tokens.append(len(word))
            self.text += piece
            self.stats.new_tokens += 1
            yield len(word), piece


class RecordingChat(ScriptedChat):
    """ScriptedChat that tells its engine which prompt it rendered last."""

    def __init__(self, engine: ScriptedEngine):
        self.engine = engine

    def render(self, messages):
        prompt = super().render(messages)
        self.engine.prompts.append(prompt)
        return prompt


class InProcessRanks:
    """EngineRanks' interface over one in-process rank: worker calls run in a thread each."""

    def __init__(self, engine: ScriptedEngine, timeout: float = 10.0):
        engine.chat = RecordingChat(engine)
        self.engine, self.timeout = engine, timeout
        self.worker = Worker(make_engine=lambda model, **options: engine)
        self.ranks = [{"rank": 0, "size": 1, "host": "here", "pid": 0, "engine": 0}]
        self.local = True
        self.interrupts = 0
        self.restarts = 0
        self.closed = False
        self.down_reason: str | None = None  # set to make the rank look dead, as EngineRanks.down() reports

    def call(self, fn, *args) -> "ThreadCall":
        return ThreadCall(fn, args)

    def call_worker(self, function: str, *args) -> "ThreadCall":
        return self.call(getattr(self.worker, function), *args)

    def wait(self, call, timeout=None) -> list:
        return call.get(timeout or self.timeout)

    def die(self, reason: str) -> None:
        """Look like EngineRanks when an engine has gone down: no more progress, down() says why."""
        self.down_reason = reason
        self.engine.frozen.set()

    def check(self, call) -> None:
        call.raise_if_failed()
        if self.down_reason is not None:
            raise EnginesDown(f"{self.down_reason}; the engines restart with the next request")

    def down(self) -> str | None:
        return self.down_reason

    def refresh(self) -> None:
        """Nobody else restarts this rank: what the controller has is what there was."""

    def interrupt_rank0(self) -> None:
        self.interrupts += 1
        self.worker.request_stop()

    def restart(self) -> None:
        self.worker.request_stop()  # the old rank's reply ends once thawed; nobody reads it
        self.restarts += 1
        self.down_reason = None
        self.engine.frozen.clear()
        self.worker = Worker(make_engine=lambda model, **options: self.engine)

    def close(self) -> None:
        self.closed = True


class ThreadCall:
    """RankCall's interface for one rank: the function runs in a thread."""

    def __init__(self, fn, args):
        self._result, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args):
        try:
            self._result = fn(*args)
        except Exception as e:
            self._error = e

    def ready(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, seconds: float) -> None:
        self._thread.join(seconds)

    def raise_if_failed(self) -> None:
        if self.ready() and self._error is not None:
            raise LlaisysError(f"rank 0: {self._error}")

    def get(self, timeout: float) -> list:
        self._thread.join(timeout)
        if not self.ready():
            raise LlaisysError(f"the engines did not finish within {timeout:.0f} s")
        self.raise_if_failed()
        return [self._result]


def fake_cluster(folder: Path, reply_for=None, step_seconds: float = 0.0,
                 token_timeout: float = 10.0) -> tuple[Cluster, InProcessRanks]:
    """A connected Cluster over one scripted in-process rank, and that rank. The scripted "model" is
    `folder`, which only needs to look like a model folder to the client."""
    (folder / "config.json").write_text("{}")
    ranks = InProcessRanks(ScriptedEngine(reply_for, step_seconds))
    client = Cluster(ranks, token_timeout=token_timeout, say=lambda message: None)
    client.load(str(folder))
    return client, ranks
