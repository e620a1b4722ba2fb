"""The engine side of the cluster: runs inside every ipyparallel engine, one per MPI rank.

The client calls these functions on all engines at once (each call is collective over
COMM_WORLD). The loaded model lives in this module between calls, so a second client, or a
restarted REPL, finds it already loaded.

While a reply runs, rank 0 sends each text piece straight to the client over its own socket
(stream_link.py: microseconds per token, unlike ipyparallel's output channels) and reads stop
requests from it between steps. A stop, or SIGINT/SIGUSR1 reaching any rank, sets a flag that the rank folds into that
step's token agreement, so every rank leaves the loop at the same step: none is left waiting inside
a collective (a KeyboardInterrupt raised inside the loop would do exactly that).
"""
import os
import signal
import socket
import time

from . import stream_link
from .comm import MPIGroup
from .engine import Engine
from .errors import LlaisysError
from .messages import opens_reasoning
from .sampling import SamplingParams

_state = {"engine": None, "spec": None, "stop": False, "link": None}


def rank_info() -> dict:
    """Where this engine runs: MPI rank and size, host and pid."""
    from mpi4py import MPI

    return {"rank": MPI.COMM_WORLD.Get_rank(), "size": MPI.COMM_WORLD.Get_size(), "host": socket.gethostname(),
            "pid": os.getpid()}


def load(spec: dict) -> dict:
    """Collective: load spec["model"] (engine options in spec) unless this exact spec is loaded."""
    # The client's fallback stop (before rank 0 has connected) is SIGUSR1, whose default action
    # would end the engine: here it only sets the flag.
    signal.signal(signal.SIGUSR1, _request_stop)
    if _state["spec"] != spec:
        _state["engine"] = None  # free the old shard before the new one loads
        _state["spec"] = None
        options = {k: v for k, v in spec.items() if k != "model"}
        _state["engine"] = Engine(spec["model"], group=MPIGroup(), **options)
        _state["spec"] = spec
        return {**info(), "loaded_now": True}
    return {**info(), "loaded_now": False}


def loaded_spec() -> dict | None:
    """The spec of the model these engines hold, or None."""
    return _state["spec"]


def info() -> dict:
    """This rank's model, shard, memory and context size."""
    return _engine().info()


def drop_session(key: str) -> None:
    """Forget a conversation's cache on this rank."""
    _engine().drop_cache(key)


def generate(request: dict) -> dict | None:
    """Collective: one reply. Rank 0 streams pieces to the client at request["stream_to"] and returns the result."""
    engine = _engine()
    rank0 = engine.group.rank == 0
    _state["stop"] = False
    if rank0:
        _connect(request["stream_to"])
    previous_sigint = signal.signal(signal.SIGINT, _request_stop)
    try:
        prompt = engine.chat.render(request["messages"])
        prompt_ids = engine.chat.encode(prompt)
        params = SamplingParams(**request["sampling"])
        run = engine.generate(prompt_ids, params, max_new_tokens=request["max_new_tokens"], stop=tuple(request["stop"]),
                              cache_key=request["session"], should_stop=_stop_check(rank0, request["id"]))
        # A prompt that opened the reasoning block: the client sees the tag, as if the model wrote it.
        opened = lead = "<think>" if opens_reasoning(prompt) else ""
        for _, piece in run:
            if rank0 and (piece or lead):
                _send({"id": request["id"], "text": lead + piece, "time": time.time()})
                lead = ""
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    if not rank0:
        return None
    _send({"id": request["id"], "done": True})
    return {"id": request["id"], "text": opened + run.text, "prompt_ids": prompt_ids, "new_ids": run.tokens,
            "stats": run.stats.to_dict()}


def _engine() -> Engine:
    if _state["engine"] is None:
        raise LlaisysError("no model is loaded on the engines (connect with a model first)")
    return _state["engine"]


def _request_stop(signum, frame):
    _state["stop"] = True


def _stop_check(rank0: bool, request_id: str):
    """The per-step stop check: a signal on any rank, or on rank 0 a stop message for this request
    (or the client gone: nobody would read the rest)."""
    def check() -> bool:
        if rank0 and _state["link"] is not None:
            try:
                messages = _state["link"][1].receive(0)
            except OSError:
                messages = None
            if messages is None:
                _disconnect()
            elif any(m.get("stop") == request_id for m in messages):
                _state["stop"] = True
        return _state["stop"]
    return check


def _send(message: dict) -> None:
    """Send to the client, if connected; if it has gone, the reply stops (every rank, next step)."""
    if _state["link"] is None:
        return
    try:
        _state["link"][1].send(message)
    except OSError:
        _disconnect()


def _connect(address: str) -> None:
    """Rank 0's connection to the client at address, kept while the client stays the same. If the
    client cannot be reached, the reply stops at its first step, on every rank."""
    held = _state["link"]
    if held is not None and held[0] == address:
        return
    if held is not None:
        held[1].close()
    try:
        _state["link"] = (address, stream_link.connect(address))
    except OSError:
        _state["link"], _state["stop"] = None, True


def _disconnect() -> None:
    """The client has gone: drop its connection and stop the reply."""
    _state["link"][1].close()
    _state["link"], _state["stop"] = None, True
