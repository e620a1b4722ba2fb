"""The Python API: an ipyparallel cluster whose engines are the MPI ranks of one tensor-parallel model.

    from llaisys_chat import cluster
    c = cluster.connect()                 # the running cluster (ipcluster start --engines=MPI -n 4),
    print(c.generate("Hi"))               # or a new local one when none runs
    for piece in c.generate("Tell me a story", stream=True):
        print(piece, end="", flush=True)
    chat = c.session(system="Be brief.")
    chat.send("What is MPI?")

The REPL, the magic and the chat kernel are built on this too. The machinery is in client/.
"""
import sys

from .client.connection import ClusterClient
from .client.launch import open_ranks
from .client.session import CHAT_DEFAULTS, Session
from .model.files import running_size

CONNECT_TIMEOUT = 120.0  # seconds for a cluster to start or its engines to register
TOKEN_TIMEOUT = 600.0    # seconds without any progress before a reply counts as hung


class Cluster(ClusterClient):
    """A connected cluster holding a model; besides replies, it starts conversations."""

    def session(self, system: str | None = None, **sampling) -> Session:
        """A new conversation with its own cache on the engines (sampling defaults: Qwen's chat settings)."""
        return Session(self, system=system, sampling={**CHAT_DEFAULTS, **sampling})


def connect(model: str | None = "demo", profile: str | None = None, cluster_id: str | None = None, n: int | None = None,
            *, connection_file: str | None = None, start: bool = True, timeout: float = CONNECT_TIMEOUT,
            token_timeout: float = TOKEN_TIMEOUT, quiet: bool = False, **engine_options) -> Cluster:
    """Connect to the running cluster (or start a local one) and make sure `model` is loaded.

    profile / cluster_id / connection_file pick the cluster (default: ipcluster's default profile).
    With no cluster running and start=True, one is started with `n` MPI engines (default: the
    layout of client/launch.py, which splits the cores among them) and stopped when this client closes. model=None keeps whatever model the engines hold
    ('demo' if none). engine_options (weights, threads, max_context, reduction, cache_slots) go to
    each rank's Engine.
    """
    say = (lambda message: None) if quiet else (lambda message: print(f"llaisys: {message}", file=sys.stderr))
    weights = engine_options.get("weights", "auto")
    model_bytes = (lambda: running_size(model, weights)) if model is not None else None
    ranks = open_ranks(profile, cluster_id, n, connection_file=connection_file, start=start, model_bytes=model_bytes,
                       timeout=timeout, say=say)
    client = Cluster(ranks, token_timeout=token_timeout, say=say)
    try:
        client.load(model, **engine_options)
    except BaseException:
        client.close()
        raise
    return client
