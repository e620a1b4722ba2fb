"""ClusterClient: a model loaded across the ranks of one cluster, and replies from it.

Every call runs the engine worker's functions on all ranks at once (ranks.py). Tokens do not travel
through ipyparallel: rank 0 connects to a socket this client listens on (stream_link.py), sends text
pieces over it and reads stop requests from it, so streaming costs microseconds per token.
"""
import os
import socket
import threading

from ..errors import EnginesDown, LlaisysError
from ..model.files import resolve_model
from ..protocol.messages import build_messages
from ..protocol.request import MAX_NEW_TOKENS, ReplyRequest, check_context_policy
from ..protocol.sampling import SamplingParams
from .batched_replies import BatchedReplies
from .ranks import counted
from .reply_stream import ReplyStream
from .stream_link import StreamLink

LOAD_TIMEOUT = 1800.0  # a first load may download and convert the model


class ClusterClient:
    """A model loaded across the engines of one cluster: generate replies, inspect, restart."""

    def __init__(self, ranks, *, token_timeout: float, say):
        self._ranks, self.token_timeout, self._say = ranks, token_timeout, say
        self.spec: dict | None = None
        self._link: StreamLink | None = None  # where rank 0 streams to (made on the first reply)
        self._batched: BatchedReplies | None = None

    @property
    def n_ranks(self) -> int:
        """Number of MPI ranks (engines) sharing the model."""
        return len(self._ranks.ranks)

    def load(self, model: str | None = "demo", **engine_options) -> dict:
        """Load `model` on every rank unless the engines already hold it with these options."""
        held = self._on_ranks("loaded_spec")[0]
        if model is None:
            if held is not None and not engine_options:
                self.spec = held
                return self.info()
            model = held["model"] if held else "demo"
        spec = {"model": str(model), **engine_options}
        if held != spec:
            if self._ranks.local:
                # Download/convert here, where progress shows; the engines then find the files ready.
                resolve_model(model)
            self._say(f"loading {model} on {counted(self.n_ranks, 'rank')}...")
        results = self._on_ranks("load", spec, timeout=LOAD_TIMEOUT)
        self.spec = spec
        if results[0]["loaded_now"]:
            self._say(f"{model} loaded ({results[0]['max_context']} tokens of context)")
        return self._summary(results)

    def generate(self, prompt_or_messages, *, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop=(), stream: bool = False, system: str | None = None,
                 session_key: str = "default", context: str = "trim"):
        """A reply to a prompt string or a message list: a Reply, or with stream=True a ReplyStream
        that yields text pieces as the engines produce them. Defaults are greedy. context="trim" lets
        the oldest messages go when the conversation outgrows the context (stats.dropped_messages
        says how many); "error" refuses it."""
        request = self.request(prompt_or_messages, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, stop=stop, system=system, session_key=session_key, context=context)
        reply_stream = ReplyStream(request, self._ready_ranks(), self._stream_link(), self.token_timeout)
        if stream:
            return reply_stream
        for _ in reply_stream:
            pass
        return reply_stream.reply

    def generate_many(self, prompts, **options) -> list:
        """Replies to several prompts (strings or message lists) at once, decoded together on the
        engines (each gives the tokens it would alone); `options` as for generate(), without stream.
        Returns the Replies in the prompts' order; the first failure raises once all have ended."""
        requests = [self.request(p, **options) for p in prompts]
        done, outcomes = threading.Semaphore(0), [None] * len(requests)  # (reply, error) by position
        for i, request in enumerate(requests):
            def on_end(reply, error, i=i):
                outcomes[i] = (reply, error)
                done.release()
            self.batched().submit(request, lambda piece: None, on_end)
        for _ in requests:
            done.acquire()
        for _, error in outcomes:
            if error is not None:
                raise error
        return [reply for reply, _ in outcomes]

    def batched(self) -> BatchedReplies:
        """Replies decoded together for concurrent callers (a server's requests): submit() them.
        While it has replies running, this client's generate() must wait (they share the link)."""
        if self._batched is None:
            self._batched = BatchedReplies(self._ready_ranks, self._stream_link, self.token_timeout)
        return self._batched

    def request(self, prompt_or_messages, *, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=(), system: str | None = None,
                session_key: str = "default", context: str = "trim") -> ReplyRequest:
        """The request generate() sends for these arguments, checked."""
        check_context_policy(context)
        if isinstance(prompt_or_messages, str):
            messages = build_messages(prompt_or_messages, system)
        else:
            messages = build_messages(None, system, prompt_or_messages)
        return ReplyRequest(messages, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
                            int(max_new_tokens), (stop,) if isinstance(stop, str) else tuple(stop), session_key,
                            context)

    def drop_session(self, key: str) -> None:
        """Free a conversation's cache on the engines."""
        self._on_ranks("drop_session", key)

    def down(self) -> str | None:
        """Why the engines cannot serve now (one died, stopped or left), or None; restarts nothing."""
        return self._ranks.down()

    def info(self) -> dict:
        """Model, ranks, context size and per-rank memory."""
        return self._summary(self._on_ranks("info"))

    def run_on_ranks(self, fn, *args, timeout: float | None = None) -> list:
        """fn(*args) on every rank at once (a collective, if fn is one); results in rank order.
        Errors become one-line LlaisysErrors; for diagnostics and benchmarks."""
        ranks = self._ready_ranks()
        return ranks.wait(ranks.call(fn, *args), timeout)

    def restart(self) -> None:
        """Restart the engines (e.g. after one died or failed) and load the model again."""
        self._say("restarting the engines...")
        self._ranks.restart()
        reason = self._ranks.down()
        if reason is not None:
            raise LlaisysError(f"the engines went down again as they restarted: {reason}")
        self._link_to_new_rank0()
        spec, self.spec = self.spec, None
        if spec is not None:
            self.load(**spec)

    def close(self) -> None:
        """Disconnect; stop the cluster too if this client started it."""
        if self._batched is not None:
            self._batched.close()
            self._batched = None
        if self._link is not None:
            self._link.close()
            self._link = None
        self._ranks.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _on_ranks(self, function: str, *args, timeout: float | None = None) -> list:
        """The engine worker's function(*args) on every rank; results in rank order."""
        ranks = self._ready_ranks()
        return ranks.wait(ranks.call_worker(function, *args), timeout)

    def _ready_ranks(self):
        """The ranks, restarted (and the model reloaded) first if an engine is down: recovery
        needs no command, and conversations carry on from the messages they hold."""
        reason = self._ranks.down()
        if reason is None:
            return self._ranks
        try:  # another client sharing the cluster may have restarted them already
            self._ranks.refresh()
            if self._ranks.down() is None:
                self._link_to_new_rank0()
                if self.spec is not None:
                    self.load(**self.spec)  # loads only if the new engines hold something else
                return self._ranks
        except LlaisysError:
            pass
        self._say(f"{reason}; restarting the engines and reloading the model...")
        try:
            self.restart()
        except EnginesDown:
            raise
        except LlaisysError as e:
            raise EnginesDown(f"{reason}, and the restart failed: {e}") from None
        return self._ranks

    def _link_to_new_rank0(self) -> None:
        """Forget the old rank 0's connection: the new one connects anew."""
        if self._link is not None:
            self._link.drop_connection()

    def _stream_link(self) -> StreamLink:
        if self._link is None:
            advertised = None if self._ranks.local else (
                os.environ.get("LLAISYS_CLIENT_IP") or socket.gethostbyname(socket.gethostname()))
            self._link = StreamLink(self._ranks.local, advertised)
        return self._link

    def _summary(self, per_rank: list[dict]) -> dict:
        first, ranks = per_rank[0], self._ranks.ranks
        return {"model": self.spec["model"] if self.spec else first["model"], "folder": first["model"],
                "ranks": self.n_ranks, "max_context": first["max_context"], "weights": first["weights"],
                "threads_per_rank": first["threads"], "cache_slots": first["cache_slots"], "hosts": sorted({r["host"] for r in ranks}),
                "per_rank": [{"rank": r["rank"], "host": r["host"], "pid": r["pid"], "rss_bytes": i["rss_bytes"],
                              "weight_bytes": i["weight_bytes"], "cache_bytes": i["cache_bytes"], "shard": i["shard"]}
                             for r, i in zip(ranks, per_rank)]}
