"""The client side of llaisys-chat: an ipyparallel cluster whose engines are the MPI ranks of one
tensor-parallel model.

    from llaisys_chat import cluster
    c = cluster.connect()                 # the running cluster (ipcluster start --engines=MPI -n 4),
    print(c.generate("Hi"))               # or a new local one when none runs
    for piece in c.generate("Tell me a story", stream=True):
        print(piece, end="", flush=True)
    chat = c.session(system="Be brief.")
    chat.send("What is MPI?")

Every call runs the functions of `worker.py` on all engines at once. Tokens do not travel through
ipyparallel: rank 0 connects to a socket this client listens on (stream_link.py), sends text pieces
over it and reads stop requests from it, so streaming costs microseconds per token.
"""
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

from . import stream_link, worker
from .errors import LlaisysError
from .messages import build_messages
from .model_files import resolve_model, weight_dtype
from .reply import GenerationStats, Reply
from .sampling import SamplingParams
from .session import Session

CONNECT_TIMEOUT = 120.0   # seconds for a cluster to start or its engines to register
LOAD_TIMEOUT = 1800.0     # a first load may download and convert the model
TOKEN_TIMEOUT = 600.0     # seconds without any progress before a reply counts as hung
STOP_TIMEOUT = 30.0       # seconds for the engines to wind down after a stop
POLL_SECONDS = 0.05       # how often a waiting client checks that the engines are alive
CHAT_DEFAULTS = {"temperature": 0.7, "top_k": 20, "top_p": 0.8}  # Qwen2.5's recommended sampling


def connect(model: str | None = "demo", profile: str | None = None, cluster_id: str | None = None, n: int | None = None,
            *, connection_file: str | None = None, start: bool = True, timeout: float = CONNECT_TIMEOUT,
            token_timeout: float = TOKEN_TIMEOUT, quiet: bool = False, **engine_options) -> "ClusterClient":
    """Connect to the running cluster (or start a local one) and make sure `model` is loaded.

    profile / cluster_id / connection_file pick the cluster (default: ipcluster's default profile).
    With no cluster running and start=True, one is started with `n` MPI engines (default: one per
    core) and stopped when this client closes. model=None keeps whatever model the engines hold
    ('demo' if none). engine_options (threads, max_context, compute, reduction, cache_slots) go to
    each rank's Engine.
    """
    import ipyparallel as ipp

    say = (lambda *a: None) if quiet else (lambda msg: print(f"llaisys: {msg}", file=sys.stderr))
    cluster, owned = None, False
    if connection_file is not None:
        if not Path(connection_file).exists():
            raise LlaisysError(f"{connection_file}: connection file not found")
        client = ipp.Client(connection_file)
    else:
        cluster = _running_cluster(profile, cluster_id)
        if cluster is None:
            if not start:
                raise LlaisysError(f"no cluster is running for profile {profile or 'default'!r}")
            n = n or len(os.sched_getaffinity(0))
            say(f"no cluster running; starting one with {n} MPI engines on this machine")
            cluster, owned = _start_cluster(profile, cluster_id, n, timeout), True
        try:
            client = cluster.connect_client_sync()
        except Exception as e:
            _stop_if_owned(cluster, owned)
            raise LlaisysError(f"cannot connect to the cluster ({e})") from None
    try:
        c = ClusterClient(client, cluster, owned, timeout=timeout, token_timeout=token_timeout, say=say)
    except BaseException:
        client.close()
        _stop_if_owned(cluster, owned)
        raise
    try:
        c.load(model, **engine_options)
    except BaseException:
        c.close()
        raise
    return c


def _stop_if_owned(cluster, owned: bool) -> None:
    """Stop a cluster that this process started (after a failed connect)."""
    if owned:
        cluster.stop_cluster_sync()


class ClusterClient:
    """A model loaded across the engines of one cluster; generate replies and hold sessions."""

    def __init__(self, client, cluster, owned: bool, *, timeout: float, token_timeout: float, say):
        self._client, self._cluster, self._owned = client, cluster, owned
        self.timeout, self.token_timeout, self._say = timeout, token_timeout, say
        self.spec: dict | None = None
        self._listener = None  # where rank 0 connects to stream (made on the first reply)
        self._link = None      # rank 0's connection, kept between replies
        self._ranks = self._discover_ranks()

    # -- setup ---------------------------------------------------------------------------------

    def _discover_ranks(self) -> list[dict]:
        """Wait for the engines and check that they are the ranks of one MPI communicator."""
        expected = self._cluster_size()
        try:
            self._client.wait_for_engines(expected or 1, timeout=self.timeout, interactive=False)
        except TimeoutError:
            raise LlaisysError(f"the cluster's engines did not register within {self.timeout:.0f} s") from None
        ids = sorted(self._client.ids)
        try:
            infos = self._client[ids].apply_sync(worker.rank_info)
        except Exception as e:
            raise _user_error(e) from None
        for engine_id, info in zip(ids, infos):
            info["engine"] = engine_id
        sizes = {i["size"] for i in infos}
        ranks = sorted(i["rank"] for i in infos)
        if sizes != {len(infos)} or ranks != list(range(len(infos))):
            raise LlaisysError(f"the cluster's {len(infos)} engines are not the ranks of one MPI communicator "
                               f"(sizes {sorted(sizes)}, ranks {ranks}); start it with --engines=MPI")
        return sorted(infos, key=lambda i: i["rank"])

    def _cluster_size(self) -> int | None:
        if self._cluster is None:
            return None
        return sum(es.n for es in self._cluster.engines.values()) or None

    @property
    def n_ranks(self) -> int:
        """Number of MPI ranks (engines) sharing the model."""
        return len(self._ranks)

    def load(self, model: str | None = "demo", **engine_options) -> dict:
        """Load `model` on every rank unless the engines already hold it with these options."""
        held = self.run_on_ranks(worker.loaded_spec, timeout=self.timeout)[0]
        if model is None:
            if held is not None and not engine_options:
                self.spec = held
                return self.info()
            model = held["model"] if held else "demo"
        spec = {"model": str(model), **engine_options}
        if held != spec:
            if all(r["host"] == socket.gethostname() for r in self._ranks):
                # Download/convert here, where progress shows; the engines then find the files ready.
                resolve_model(model, dtype=weight_dtype(engine_options.get("compute", "auto")))
            self._say(f"loading {model} on {self.n_ranks} ranks...")
        results = self.run_on_ranks(worker.load, spec, timeout=LOAD_TIMEOUT)
        self.spec = spec
        if results[0]["loaded_now"]:
            self._say(f"{model} loaded ({results[0]['max_context']} tokens of context)")
        return self._summary(results)

    # -- replies -------------------------------------------------------------------------------

    def generate(self, prompt_or_messages, *, max_new_tokens: int = 512, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop=(), stream: bool = False, system: str | None = None,
                 session_key: str = "default"):
        """A reply to a prompt string or a message list: a Reply, or with stream=True a ReplyStream
        that yields text pieces as the engines produce them. Defaults are greedy."""
        if isinstance(prompt_or_messages, str):
            messages = build_messages(prompt_or_messages, system)
        else:
            messages = build_messages(None, system, prompt_or_messages)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if isinstance(stop, str):
            stop = (stop,)
        request = {"id": uuid.uuid4().hex, "messages": messages, "sampling": params.to_dict(),
                   "max_new_tokens": int(max_new_tokens), "stop": list(stop), "session": session_key}
        reply_stream = ReplyStream(self, request)
        if stream:
            return reply_stream
        for _ in reply_stream:
            pass
        return reply_stream.reply

    def session(self, system: str | None = None, **sampling) -> Session:
        """A new conversation with its own cache on the engines (sampling defaults: Qwen's chat settings)."""
        return Session(self, system=system, sampling={**CHAT_DEFAULTS, **sampling})

    def drop_session(self, key: str) -> None:
        """Free a conversation's cache on the engines."""
        self.run_on_ranks(worker.drop_session, key, timeout=self.timeout)

    def info(self) -> dict:
        """Model, ranks, context size and per-rank memory."""
        return self._summary(self.run_on_ranks(worker.info))

    def _summary(self, per_rank: list[dict]) -> dict:
        first = per_rank[0]
        return {"model": self.spec["model"] if self.spec else first["model"], "folder": first["model"],
                "ranks": self.n_ranks, "max_context": first["max_context"], "compute": first["compute"],
                "threads_per_rank": first["threads"], "hosts": sorted({r["host"] for r in self._ranks}),
                "per_rank": [{"rank": r["rank"], "host": r["host"], "pid": r["pid"], "rss_bytes": i["rss_bytes"],
                              "weight_bytes": i["weight_bytes"], "cache_bytes": i["cache_bytes"], "shard": i["shard"]}
                             for r, i in zip(self._ranks, per_rank)]}

    # -- lifecycle -----------------------------------------------------------------------------

    def restart(self) -> None:
        """Restart the engines (e.g. after one died or failed) and load the model again."""
        if self._cluster is None:
            raise LlaisysError("restart needs a cluster started by ipcluster or by llaisys (not a bare connection file)")
        self._say("restarting the engines...")
        old_pids = {r["pid"] for r in self._ranks}
        try:
            self._cluster.restart_engines_sync()
        except Exception as e:
            raise LlaisysError(f"could not restart the engines ({e})") from None
        # The controller notices the old engines' end by heartbeat: until then they still look registered.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                ranks = self._discover_ranks()
                if not {r["pid"] for r in ranks} & old_pids:
                    break
            except LlaisysError:
                pass
            if time.monotonic() > deadline:
                raise LlaisysError(f"the restarted engines did not register within {self.timeout:.0f} s")
            time.sleep(0.5)
        self._ranks = ranks
        if self._link is not None:  # the new rank 0 connects anew
            self._link.close()
            self._link = None
        spec, self.spec = self.spec, None
        if spec is not None:
            self.load(**spec)

    def close(self) -> None:
        """Disconnect; stop the cluster too if this client started it."""
        for end in (self._link, self._listener):
            if end is not None:
                end.close()
        self._link = self._listener = None
        self._client.close()
        if self._owned and self._cluster is not None:
            self._cluster.stop_cluster_sync()
            self._owned = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- plumbing ------------------------------------------------------------------------------

    def run_on_ranks(self, fn, *args, timeout: float | None = None) -> list:
        """fn(*args) on every rank at once (a collective, if fn is one); results in rank order.
        Errors become one-line LlaisysErrors; used for diagnostics and benchmarks too."""
        call = RankCall(self, fn, *args)
        deadline = time.monotonic() + (timeout or self.timeout)
        while not call.ready():
            self._raise_if_failed(call)
            if time.monotonic() > deadline:
                raise LlaisysError(f"the engines did not answer within {timeout or self.timeout:.0f} s")
            call.wait(POLL_SECONDS)
        return call.get(0)

    def _check_engines_alive(self) -> None:
        """Raise if an engine process on this machine has died (remote ones are watched by heartbeats)."""
        here = socket.gethostname()
        for r in self._ranks:
            if r["host"] == here and not _pid_alive(r["pid"]):
                raise LlaisysError(f"engine rank {r['rank']} (pid {r['pid']}) died; call restart() to start the "
                                   f"engines again and reload the model")

    def _stream_address(self) -> str:
        """Where rank 0 should connect to stream to this client (listening from the first call on)."""
        if self._listener is None:
            local = all(r["host"] == socket.gethostname() for r in self._ranks)
            host = None if local else os.environ.get("LLAISYS_CLIENT_IP") or socket.gethostbyname(socket.gethostname())
            self._listener = stream_link.Listener(local, host)
        return self._listener.address

    def _wait_for_link(self, result, deadline: float):
        """Rank 0's connection: the one kept from earlier replies, or the one it makes for this reply."""
        while self._link is None:
            self._link = self._listener.accept(POLL_SECONDS)
            if self._link is None:
                self._raise_if_failed(result)
                if time.monotonic() > deadline:
                    raise LlaisysError(f"rank 0 did not connect within {self.token_timeout:.0f} s")
        return self._link

    def _request_stop(self, request_id: str) -> None:
        """Tell rank 0 to stop a reply: over its connection, or by signal if it has not connected yet."""
        if self._link is None and self._listener is not None:
            self._link = self._listener.accept(POLL_SECONDS)
        try:
            if self._link is not None:
                self._link.send({"stop": request_id})
                return
        except OSError:
            self._link.close()
            self._link = None
        self._client.send_signal(signal.SIGUSR1, targets=[self._ranks[0]["engine"]], block=False)

    def _raise_if_failed(self, call: "RankCall") -> None:
        """Raise if a rank's part of the call failed, or an engine died: the other ranks may then be
        waiting in a collective for it, so this cannot wait for the whole call to end."""
        call.raise_if_failed()
        self._check_engines_alive()


class RankCall:
    """One function running on every rank at once, with a result per rank (so that one rank's
    failure shows at once, while the others may still be waiting for it)."""

    def __init__(self, client: ClusterClient, fn, *args):
        self._ranks = client._ranks
        self._results = [client._client[r["engine"]].apply_async(fn, *args) for r in self._ranks]

    def ready(self) -> bool:
        """Whether every rank has finished."""
        return all(r.ready() for r in self._results)

    def wait(self, seconds: float) -> None:
        """Wait up to seconds for a rank that has not finished yet."""
        pending = [r for r in self._results if not r.ready()]
        if pending:
            pending[0].wait(seconds)

    def raise_if_failed(self) -> None:
        """Raise the first failure among the ranks that have finished."""
        for rank, result in zip(self._ranks, self._results):
            if result.ready():
                try:
                    result.get(timeout=0)
                except Exception as e:
                    error = _user_error(e)
                    message = str(error) if str(error).startswith("rank ") else f"rank {rank['rank']}: {error}"
                    raise LlaisysError(message) from None

    def get(self, timeout: float) -> list:
        """Every rank's result, waiting up to timeout seconds; a failure raises as a LlaisysError."""
        deadline = time.monotonic() + timeout
        for result in self._results:
            result.wait(max(0.0, deadline - time.monotonic()))
        self.raise_if_failed()
        if not self.ready():
            raise LlaisysError(f"the engines did not finish within {timeout:.0f} s")
        return [r.get(timeout=0) for r in self._results]


class ReplyStream:
    """A reply in progress. Iterate for text pieces; `.reply` holds the result once finished;
    `.stop()` (or Ctrl-C while iterating) ends it on every rank at the same step, keeping the text
    so far. `.delays` records, per piece, seconds from the engine choosing it to its arrival here."""

    def __init__(self, client: ClusterClient, request: dict):
        self._client, self._request = client, request
        self.reply: Reply | None = None
        self.text = ""
        self.delays: list[float] = []
        self.first_piece_seconds: float | None = None
        self._result = None
        self._started = False

    def __iter__(self):
        if self._started:
            raise LlaisysError("a reply stream can be iterated only once")
        self._started = True
        client = self._client
        self._request["stream_to"] = client._stream_address()
        start = time.monotonic()
        self._result = RankCall(client, worker.generate, self._request)
        try:
            yield from self._receive(start)
        except (KeyboardInterrupt, GeneratorExit):
            self.stop()
            self._finish(interrupted=True)
            raise
        self._finish(interrupted=False)

    def stop(self) -> None:
        """Ask the engines to stop this reply (they stop together at their next step)."""
        self._client._request_stop(self._request["id"])

    def _receive(self, start):
        """Yield pieces until rank 0 says done; meanwhile watch for failed or dead engines."""
        client = self._client
        link = client._wait_for_link(self._result, start + client.token_timeout)
        last_progress = time.monotonic()
        while True:
            messages = link.receive(POLL_SECONDS)
            if messages is None:  # a connection from an earlier rank 0: this one connects anew, or has failed
                link.close()
                client._link = None
                link = client._wait_for_link(self._result, time.monotonic() + client.token_timeout)
                continue
            for message in messages:
                if message["id"] != self._request["id"]:
                    continue  # left over from an earlier, abandoned reply
                if message.get("done"):
                    return
                if self.first_piece_seconds is None:
                    self.first_piece_seconds = time.monotonic() - start
                self.delays.append(time.time() - message["time"])
                self.text += message["text"]
                last_progress = time.monotonic()
                yield message["text"]
            if not messages:
                client._raise_if_failed(self._result)
                if time.monotonic() - last_progress > client.token_timeout:
                    raise LlaisysError(f"no progress from the engines for {client.token_timeout:.0f} s; "
                                       f"call restart() if they are stuck")

    def _finish(self, interrupted: bool) -> None:
        """Collect rank 0's result once every rank has finished, and build the Reply."""
        try:
            result = self._result.get(STOP_TIMEOUT if interrupted else self._client.token_timeout)[0]
        except Exception as e:
            if interrupted:
                self.reply = Reply(self.text, stats=GenerationStats(finish_reason="interrupted"))
                return
            raise _user_error(e) from None
        stats = GenerationStats.from_dict(result["stats"])
        if self.first_piece_seconds is not None:
            stats.first_token_seconds = self.first_piece_seconds
        self.reply = Reply(result["text"], result["prompt_ids"], result["new_ids"], stats)


def _running_cluster(profile, cluster_id):
    """The cluster ipcluster (or an earlier llaisys client) left a file for, if it is still alive."""
    import ipyparallel as ipp

    try:
        cluster = ipp.Cluster.from_file(profile=profile or "default", cluster_id=cluster_id or "", log_level=40)
    except FileNotFoundError:
        return None
    pid = getattr(cluster.controller, "pid", None) if cluster.controller is not None else None
    if pid is not None and not _pid_alive(pid):
        return None  # a stale file from a cluster that is gone
    return cluster


def _start_cluster(profile, cluster_id, n: int, timeout: float):
    """A local cluster of n engines launched by mpiexec, stopped when this process exits."""
    import ipyparallel as ipp
    from traitlets.config import Config

    config = Config()
    venv_mpiexec = Path(sys.executable).parent / "mpiexec"
    config.MPILauncher.mpi_cmd = [str(venv_mpiexec) if venv_mpiexec.exists() else "mpiexec"]
    args = []
    if os.geteuid() == 0:
        args.append("--allow-run-as-root")
    if n > len(os.sched_getaffinity(0)):
        args.append("--oversubscribe")
    config.MPILauncher.mpi_args = args
    cluster = ipp.Cluster(engines="mpi", n=n, profile=profile or "default", cluster_id=cluster_id or "",
                          controller_args=["--HeartMonitor.period=500"], config=config, log_level=40,
                          engine_timeout=timeout)
    try:
        cluster.start_cluster_sync()
    except Exception as e:
        raise LlaisysError(f"could not start a cluster ({e})") from None
    return cluster


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _user_error(e: BaseException) -> LlaisysError:
    """One line for an error raised on the engines (the first engine's, when several failed alike)."""
    from ipyparallel.error import CompositeError, EngineError, RemoteError

    if isinstance(e, LlaisysError):
        return e
    if isinstance(e, CompositeError) and e.elist:
        ename, evalue = e.elist[0][0], e.elist[0][1]
    elif isinstance(e, RemoteError):
        ename, evalue = e.ename, e.evalue
    elif isinstance(e, EngineError):
        return LlaisysError(f"an engine died ({e}); call restart() to start the engines again")
    else:
        return LlaisysError(f"{type(e).__name__}: {e}")
    if ename == "LlaisysError":
        return LlaisysError(str(evalue))
    if ename == "EngineError":
        return LlaisysError(f"an engine died ({evalue}); call restart() to start the engines again")
    return LlaisysError(f"engine error: {ename}: {evalue}")
