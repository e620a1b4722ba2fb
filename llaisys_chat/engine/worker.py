"""The engine side of the cluster: runs inside every ipyparallel engine, one per MPI rank.

The client calls this module's functions by name on all engines at once (each call is collective
over COMM_WORLD). The loaded model lives here between calls, so a second client, or a restarted
REPL, finds it already loaded.

While a reply runs, rank 0 sends each text piece straight to the client over its own socket
(stream_link.py: microseconds per token, unlike ipyparallel's output channels) and reads stop
requests from it between steps. A batch of replies (generate_batch, for a server's concurrent
requests) also takes new requests from it between steps: rank 0 passes them, and the stops, to
every rank, so that all add the same replies at the same step. A stop, or SIGINT/SIGUSR1 reaching any rank, sets a flag that the
rank folds into that step's token agreement, so every rank leaves the loop at the same step: none
is left waiting inside a collective (a KeyboardInterrupt raised inside the loop would do exactly that).
"""
import contextlib
import os
import signal
import socket
from collections import deque

from ..errors import LlaisysError
from ..protocol.link import done_message, piece_message
from ..protocol.messages import opens_reasoning
from ..protocol.reply import Reply
from ..protocol.request import ReplyRequest
from .collectives import MPIGroup
from .engine import Batch, Engine
from .stream_link import ClientLink

# Replies a batch decodes at once (more wait their turn). Each takes a cache of its own, beyond the
# engine's cache slots if need be (docs/benchmarks.md: 4 and 8 at once on 2 cores).
BATCH_LIMIT = 8


class Worker:
    """One rank's state between calls: the loaded engine, and on rank 0 the link to the client."""

    def __init__(self, make_engine=None):
        self._make_engine = make_engine or (lambda model, **options: Engine(model, group=MPIGroup(), **options))
        self.engine = None
        self.spec: dict | None = None
        self.link = ClientLink()
        self.stop_requested = False  # set by a signal or a stop message; read at every decode step
        self._batched_ids: deque[str] = deque(maxlen=4096)  # requests a batch has taken (a join may come twice)

    def load(self, spec: dict) -> dict:
        """Collective: load spec["model"] (engine options in spec) unless this exact spec is loaded."""
        if self.spec == spec:
            return {**self.info(), "loaded_now": False}
        self.engine = self.spec = None  # free the old shard before the new one loads
        options = {k: v for k, v in spec.items() if k != "model"}
        self.engine = self._make_engine(spec["model"], **options)
        self.spec = spec
        return {**self.info(), "loaded_now": True}

    def loaded_spec(self) -> dict | None:
        """The spec of the model this rank holds, or None."""
        return self.spec

    def info(self) -> dict:
        """This rank's model, shard, memory and context size."""
        return self._engine().info()

    def drop_session(self, key: str) -> None:
        """Forget a conversation's cache on this rank."""
        self._engine().drop_cache(key)

    def generate(self, request: ReplyRequest) -> Reply | None:
        """Collective: one reply. Rank 0 streams its pieces to the client and returns it; others return None."""
        engine = self._engine()
        rank0 = engine.group.rank == 0
        # A client that cannot be reached makes the reply stop at its first step, on every rank.
        self.stop_requested = rank0 and not self.link.open(request.stream_to, request.stream_token)
        run = engine.reply(request.messages, request.sampling, max_new_tokens=request.max_new_tokens,
                           context=request.context, stop=request.stop, cache_key=request.session,
                           should_stop=lambda: self._should_stop(rank0, request.id))
        opened = lead = _reasoning_lead(run)
        for _, piece in run:
            if rank0 and (piece or lead):
                self._send(piece_message(request.id, lead + piece))
                lead = ""
        if not rank0:
            return None
        self._send(done_message(request.id))
        return Reply(opened + run.text, run.prompt_ids, run.tokens, run.stats)

    def generate_batch(self, requests: list[ReplyRequest]) -> None:
        """Collective: replies to `requests`, and to those the client sends to join them while they
        run, decoded together (engine.Batch); each picks the idle cache that holds the longest start
        of its prompt. Rank 0 streams every reply's pieces and, at its end, its outcome (stats, or
        the error that kept it from running). Returns once no reply is left."""
        engine = self._engine()
        rank0 = engine.group.rank == 0
        self.stop_requested = rank0 and not self.link.open(requests[0].stream_to, requests[0].stream_token)
        batch, ids, leads, stopped, arrived = Batch(engine, BATCH_LIMIT), {}, {}, set(), list(requests)
        while True:
            joins, stops = engine.group.bcast(self._batch_news(arrived) if rank0 else None)
            arrived = []
            stopped.update(stops)
            for request in joins:
                try:
                    run = engine.reply(request.messages, request.sampling, max_new_tokens=request.max_new_tokens,
                                       context=request.context, stop=request.stop, cache_key=None,
                                       busy=batch.cache_keys(),
                                       should_stop=lambda id=request.id: self.stop_requested or id in stopped)
                except LlaisysError as e:  # this request only (every rank raises alike): the others go on
                    if rank0:
                        self._send(done_message(request.id, error=str(e)))
                    continue
                ids[run], leads[run] = request.id, _reasoning_lead(run)
                batch.add(run)
            if not batch:
                return None
            for run, _, piece in batch.step():
                if not rank0:
                    continue
                text = leads.pop(run, "") + piece  # the lead goes with the first step
                if text:
                    self._send(piece_message(ids[run], text))
                if run.finished:
                    self._send(done_message(ids.pop(run), stats=run.stats.to_dict(), new_ids=run.tokens))

    def _batch_news(self, arrived: list[ReplyRequest]) -> tuple[list[ReplyRequest], list[str]]:
        """Rank 0, between batch steps: the requests that arrived (on the link, or with the call)
        and not taken before, and the ids the client asked to stop."""
        messages = self.link.messages()
        if messages is None:  # the client has gone: nobody reads the replies
            self.stop_requested, messages = True, []
        arrived = arrived + [ReplyRequest.from_dict(m["join"]) for m in messages if "join" in m]
        joins = []
        for request in arrived:
            if request.id not in self._batched_ids:
                self._batched_ids.append(request.id)
                joins.append(request)
        return joins, [m["stop"] for m in messages if "stop" in m]

    def request_stop(self) -> None:
        """Stop the running replies at the next step (safe to call from a signal handler)."""
        self.stop_requested = True

    def _should_stop(self, rank0: bool, request_id: str) -> bool:
        """The per-step check: a signal on any rank, or on rank 0 the client's stop message (or its absence)."""
        if rank0 and self.link.stop_requested(request_id):
            self.stop_requested = True
        return self.stop_requested

    def _send(self, message: dict) -> None:
        if not self.link.send(message):
            self.stop_requested = True

    def _engine(self) -> Engine:
        if self.engine is None:
            raise LlaisysError("no model is loaded on the engines (connect with a model first)")
        return self.engine


_worker = Worker()


# -- what the client calls by name on every engine --------------------------------------------------

def rank_info() -> dict:
    """Where this engine runs: MPI rank and size, host and pid."""
    from mpi4py import MPI

    return {"rank": MPI.COMM_WORLD.Get_rank(), "size": MPI.COMM_WORLD.Get_size(), "host": socket.gethostname(),
            "pid": os.getpid()}


def load(spec: dict) -> dict:
    """Collective: load a model (see Worker.load)."""
    # The client's fallback stop (before rank 0 has connected) is SIGUSR1, whose default action
    # would end the engine: here it only sets the flag.
    signal.signal(signal.SIGUSR1, lambda signum, frame: _worker.request_stop())
    return _worker.load(spec)


def loaded_spec() -> dict | None:
    """The spec of the model this rank holds, or None."""
    return _worker.loaded_spec()


def info() -> dict:
    """This rank's model, shard, memory and context size."""
    return _worker.info()


def loaded_engine() -> Engine:
    """The engine this rank holds (for diagnostics and benchmarks run on the ranks)."""
    return _worker._engine()


def drop_session(key: str) -> None:
    """Forget a conversation's cache on this rank."""
    _worker.drop_session(key)


def generate(request: ReplyRequest) -> Reply | None:
    """Collective: one reply (see Worker.generate); SIGINT meanwhile stops it instead of raising."""
    with _sigint_stops_the_reply():
        return _worker.generate(request)


def generate_batch(requests: list[ReplyRequest]) -> None:
    """Collective: replies decoded together (see Worker.generate_batch); SIGINT stops them all."""
    with _sigint_stops_the_reply():
        return _worker.generate_batch(requests)


def _reasoning_lead(run) -> str:
    """A prompt that opened the reasoning block: the client sees the tag, as if the model wrote it."""
    return "<think>" if opens_reasoning(run.prompt) else ""


@contextlib.contextmanager
def _sigint_stops_the_reply():
    previous = signal.signal(signal.SIGINT, lambda signum, frame: _worker.request_stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
