"""The engine side of the cluster: runs inside every ipyparallel engine, one per MPI rank.

The client calls these functions on all engines at once (each call is collective over
COMM_WORLD). The loaded model lives in this module between calls, so a second client, or a
restarted REPL, finds it already loaded.

While a reply runs, rank 0 pushes each text piece straight to the client over its own zmq socket
(microseconds per token, unlike ipyparallel's output channels) and polls a second socket for a stop
request. A stop, or SIGINT/SIGUSR1 reaching any rank, sets a flag that the rank folds into that
step's token agreement, so every rank leaves the loop at the same step: none is left waiting inside
a collective (a KeyboardInterrupt raised inside the loop would do exactly that).
"""
import json
import os
import signal
import socket
import time

from .comm import MPIGroup
from .engine import Engine
from .errors import LlaisysError
from .messages import opens_reasoning
from .sampling import SamplingParams

_state = {"engine": None, "spec": None, "stop": False, "sockets": {}}


def rank_info() -> dict:
    """Where this engine runs: MPI rank and size, host and pid."""
    from mpi4py import MPI

    return {"rank": MPI.COMM_WORLD.Get_rank(), "size": MPI.COMM_WORLD.Get_size(), "host": socket.gethostname(),
            "pid": os.getpid()}


def load(spec: dict) -> dict:
    """Collective: load spec["model"] (engine options in spec) unless this exact spec is loaded."""
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
    """Collective: one reply. Rank 0 streams pieces to request["stream_to"] and returns the result."""
    engine = _engine()
    rank0 = engine.group.rank == 0
    sender, control = _sockets(request) if rank0 else (None, None)
    _state["stop"] = False
    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGUSR1)}
    try:
        prompt = engine.chat.render(request["messages"])
        prompt_ids = engine.chat.encode(prompt)
        params = SamplingParams(**request["sampling"])
        run = engine.generate(prompt_ids, params, max_new_tokens=request["max_new_tokens"], stop=tuple(request["stop"]),
                              cache_key=request["session"], should_stop=_should_stop(control, request["id"]))
        # A prompt that opened the reasoning block: the client sees the tag, as if the model wrote it.
        opened = lead = "<think>" if opens_reasoning(prompt) else ""
        for _, piece in run:
            if rank0 and (piece or lead):
                sender.send(json.dumps({"id": request["id"], "text": lead + piece, "time": time.time()}).encode())
                lead = ""
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not rank0:
        return None
    result = {"id": request["id"], "text": opened + run.text, "prompt_ids": prompt_ids, "new_ids": run.tokens,
              "stats": run.stats.to_dict()}
    sender.send(json.dumps({"id": request["id"], "done": True}).encode())
    return result


def _engine() -> Engine:
    if _state["engine"] is None:
        raise LlaisysError("no model is loaded on the engines (connect with a model first)")
    return _state["engine"]


def _request_stop(signum, frame):
    _state["stop"] = True


def _should_stop(control, request_id):
    """The per-step stop check: a signal on any rank, or a stop message for this request on rank 0."""
    def check() -> bool:
        while control is not None and control.poll(0):
            if control.recv().decode() == request_id:
                _state["stop"] = True
        return _state["stop"]
    return check


def _sockets(request: dict):
    """Rank 0's (token sender, stop receiver) for this client, kept while the client stays the same."""
    import zmq

    key = (request["stream_to"], request["control_from"])
    if key not in _state["sockets"]:
        for old in _state["sockets"].values():
            for s in old:
                s.close(linger=0)
        context = zmq.Context.instance()
        sender = context.socket(zmq.PUSH)
        sender.connect(request["stream_to"])
        control = context.socket(zmq.PULL)
        control.connect(request["control_from"])
        _state["sockets"] = {key: (sender, control)}
    return _state["sockets"][key]
