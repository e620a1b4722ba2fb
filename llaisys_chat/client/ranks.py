"""The cluster's engines as the MPI ranks of one model: who they are, calls to all of them at once,
signals, restarts, and their errors turned into one-line LlaisysErrors.

The client names the engine worker's functions (engine/worker.py) instead of importing them: the
worker is imported on the engines only, so the user's process never loads the engine.

Calls go out through ipyparallel's broadcast scheduler as one message, which the scheduler passes on
to every engine in the order it received them: however many clients (a REPL, a notebook, a script)
share the cluster, every rank runs their collective calls in the same order, so no two ranks can meet
in different collectives. (A direct view sends one message per engine, and two clients' messages
could interleave differently at each.)
"""
import contextlib
import importlib
import os
import signal
import socket
import time
from pathlib import Path

from ..errors import EnginesDown, LlaisysError

WORKER_MODULE = "llaisys_chat.engine.worker"
POLL_SECONDS = 0.05  # how often a waiting client checks that the engines are alive
REFRESH_SECONDS = 2.0  # how long a client waits for the engines another client may have restarted
# What the user can do: after an engine went down, and after the controller did.
RESTARTS_NEXT = "the engines restart with the next request (or restart())"
CONTROLLER_GONE = "stop what is left of the cluster (ipcluster stop) and connect again, which starts a new one"


def counted(n: int, noun: str) -> str:
    """'1 rank', '2 ranks': for the messages that count things (ranks, engines, threads, dropped messages)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def call_worker(function: str, *args):
    """Runs on an engine: the worker's `function(*args)`."""
    return getattr(importlib.import_module(WORKER_MODULE), function)(*args)


class EngineRanks:
    """The engines of an ipyparallel cluster, checked to be the ranks of one MPI communicator."""

    def __init__(self, client, cluster=None, owned: bool = False, *, timeout: float):
        self._client, self._cluster, self._owned = client, cluster, owned
        self.timeout = timeout
        self.ranks = self._discover()  # per rank: rank, size, host, pid, engine (ipyparallel id)

    @property
    def local(self) -> bool:
        """Whether every rank runs on this machine."""
        return all(r["host"] == socket.gethostname() for r in self.ranks)

    def call(self, fn, *args) -> "RankCall":
        """Start fn(*args) on every rank at once, in the same order as every other client's calls."""
        from ipyparallel.client.asyncresult import AsyncResult

        try:
            view = self._client.broadcast_view(targets=[r["engine"] for r in self.ranks])
            sent = view.apply_async(fn, *args)
        except Exception as e:  # an engine has left the controller since: NoEnginesRegistered, ...
            raise EnginesDown(f"the engines cannot take requests ({type(e).__name__}: {e})") from None
        # One result per rank (in target order), so that a rank's failure shows while others wait.
        return RankCall(self, [AsyncResult(self._client, msg_id) for msg_id in sent.msg_ids])

    def call_worker(self, function: str, *args) -> "RankCall":
        """Start the engine worker's `function(*args)` on every rank at once."""
        return self.call(call_worker, function, *args)

    def wait(self, call: "RankCall", timeout: float | None = None) -> list:
        """The call's results in rank order. While waiting, a failed rank or a dead engine raises at once."""
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        while not call.ready():
            self.check(call)
            if time.monotonic() > deadline:
                raise LlaisysError(f"the engines did not answer within {timeout:.0f} s")
            call.wait(POLL_SECONDS)
        return call.get(0)

    def check(self, call: "RankCall") -> None:
        """Raise if a rank's part of the call failed, or an engine is down: the other ranks may then be
        waiting in a collective for it, so this cannot wait for the whole call to end."""
        reason = self.down()  # first: it names the rank and process, where a failed call only says one died
        if reason is not None:
            raise EnginesDown(f"{reason}; {CONTROLLER_GONE if self._controller_died() else RESTARTS_NEXT}")
        call.raise_if_failed()

    def down(self) -> str | None:
        """Why the ranks cannot serve (an engine process died or is stopped, an engine or the
        controller left), or None. Engines on this machine are watched directly, others through the
        controller's heartbeat."""
        here = socket.gethostname()
        if self._controller_died():
            return f"the cluster's controller (pid {self._cluster.controller.pid}) died"
        # Every one that is down: when one rank dies, mpiexec may end the others before this looks.
        local = [(r, process_state(r["pid"])) for r in self.ranks if r["host"] == here]
        dead = [r for r, state in local if state is None]
        if dead:
            return f"{_named(dead)} died"
        stopped = [r for r, state in local if state is not None and state in "Tt"]
        if stopped:
            return f"{_named(stopped)} {'is' if len(stopped) == 1 else 'are'} stopped"
        registered = set(self._client.ids)
        for r in self.ranks:
            if r["engine"] not in registered:
                return f"engine rank {r['rank']} on {r['host']} stopped answering the controller"
        return None

    def interrupt_rank0(self) -> None:
        """SIGUSR1 to rank 0, which the worker turns into a stop at the next step."""
        self._client.send_signal(signal.SIGUSR1, targets=[self.ranks[0]["engine"]], block=False)

    def restart(self) -> None:
        """Restart the engines through the cluster's launcher and wait for the new ranks."""
        if self._cluster is None:
            raise LlaisysError("the engines need a restart, and a bare connection file cannot do it: restart the "
                               "cluster (ipcluster stop; ipcluster start --engines=MPI -n N), then connect again")
        if self._controller_died():
            raise LlaisysError(f"the cluster's controller (pid {self._cluster.controller.pid}) died; {CONTROLLER_GONE}")
        old_pids = {r["pid"] for r in self.ranks}
        here = socket.gethostname()
        for r in self.ranks:  # a stopped or hung engine would hold up its launcher's shutdown
            if r["host"] == here and pid_alive(r["pid"]):
                os.kill(r["pid"], signal.SIGKILL)
        try:
            self._cluster.restart_engines_sync()
        except Exception as e:
            raise LlaisysError(f"could not restart the engines ({e})") from None
        # The controller notices the old engines' end by heartbeat: until then they still look registered.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                ranks = self._discover()
                if not {r["pid"] for r in ranks} & old_pids:
                    break
            except LlaisysError:
                pass
            if time.monotonic() > deadline:
                raise LlaisysError(f"the restarted engines did not register within {self.timeout:.0f} s")
            time.sleep(0.5)
        self.ranks = ranks

    def close(self) -> None:
        """Disconnect; stop the cluster too if it was started for these ranks."""
        self._client.close()
        if self._owned:
            self._owned = False
            # Whatever is left of it: its controller may have died, and the engines go all the same.
            with contextlib.suppress(Exception):
                self._cluster.stop_cluster_sync()

    def _controller_died(self) -> bool:
        """Whether the controller of a cluster with a known controller process has died."""
        pid = getattr(getattr(self._cluster, "controller", None), "pid", None)
        return pid is not None and not pid_alive(pid)

    def refresh(self) -> None:
        """Take the engines the controller has now (another client may have restarted them)."""
        self.ranks = self._discover(timeout=REFRESH_SECONDS)

    def _discover(self, timeout: float | None = None) -> list[dict]:
        """Wait for the engines and check that they are the ranks of one MPI communicator."""
        timeout = timeout or self.timeout
        expected = sum(es.n for es in self._cluster.engines.values()) if self._cluster is not None else 0
        try:
            self._client.wait_for_engines(expected or 1, timeout=timeout, interactive=False)
        except TimeoutError:
            raise LlaisysError(f"the cluster's engines did not register within {timeout:.0f} s") from None
        except Exception as e:  # an engine unregistered while waiting, the controller went away, ...
            raise LlaisysError(f"the cluster's engines are not ready ({type(e).__name__}: {e})") from None
        ids = sorted(self._client.ids)
        try:  # bounded: a registered engine may be stopped, and would never answer
            infos = self._client[ids].apply_async(call_worker, "rank_info").get(timeout=timeout)
        except TimeoutError:
            raise LlaisysError(f"the cluster's engines did not answer within {timeout:.0f} s") from None
        except Exception as e:
            raise user_error(e) from None
        for engine_id, info in zip(ids, infos):
            info["engine"] = engine_id
        sizes = {i["size"] for i in infos}
        ranks = sorted(i["rank"] for i in infos)
        if sizes != {len(infos)} or ranks != list(range(len(infos))):
            raise LlaisysError(f"the cluster's {len(infos)} engines are not the ranks of one MPI communicator "
                               f"(sizes {sorted(sizes)}, ranks {ranks}); start it with --engines=MPI")
        return sorted(infos, key=lambda i: i["rank"])


class RankCall:
    """One function running on every rank at once, with a result per rank (so that one rank's
    failure shows at once, while the others may still be waiting for it)."""

    def __init__(self, ranks: EngineRanks, results: list):
        self._ranks, self._results = ranks.ranks, results

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
                    error = user_error(e)
                    message = str(error) if str(error).startswith("rank ") else f"rank {rank['rank']}: {error}"
                    raise type(error)(message) from None

    def get(self, timeout: float) -> list:
        """Every rank's result, waiting up to timeout seconds; a failure raises as a LlaisysError."""
        deadline = time.monotonic() + timeout
        for result in self._results:
            result.wait(max(0.0, deadline - time.monotonic()))
        self.raise_if_failed()
        if not self.ready():
            raise LlaisysError(f"the engines did not finish within {timeout:.0f} s")
        return [r.get(timeout=0) for r in self._results]


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine still runs: a zombie (dead, not yet reaped by a parent that
    is gone too, as where no init reaps orphans) does not."""
    return process_state(pid) is not None


def _named(ranks: list[dict]) -> str:
    return " and ".join(f"engine rank {r['rank']} (pid {r['pid']})" for r in ranks)


def process_state(pid: int) -> str | None:
    """A local process's state letter (R, S, T for stopped, ...), or None if it has ended."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:  # gone, or no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    return None if state in "ZX" else state


def user_error(e: BaseException) -> LlaisysError:
    """One line for an error raised on the engines (the first engine's, when several failed alike)."""
    from ipyparallel.error import CompositeError, EngineError, RemoteError

    if isinstance(e, LlaisysError):
        return e
    if isinstance(e, CompositeError) and e.elist:
        ename, evalue = e.elist[0][0], e.elist[0][1]
    elif isinstance(e, RemoteError):
        ename, evalue = e.ename, e.evalue
    elif isinstance(e, EngineError):
        return EnginesDown(f"an engine died ({e}); {RESTARTS_NEXT}")
    else:
        return LlaisysError(f"{type(e).__name__}: {e}")
    if ename == "LlaisysError":
        return LlaisysError(str(evalue))
    if ename == "EngineError":
        return EnginesDown(f"an engine died ({evalue}); {RESTARTS_NEXT}")
    return LlaisysError(f"engine error: {ename}: {evalue}")
