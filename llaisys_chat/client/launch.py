"""Finding the running ipyparallel cluster, or starting a local one whose engines are MPI ranks."""
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import LlaisysError
from .ranks import EngineRanks, counted, pid_alive


def open_ranks(profile: str | None = None, cluster_id: str | None = None, n: int | None = None, *,
               connection_file: str | None = None, start: bool = True,
               model_bytes: Callable[[], int | None] | None = None, timeout: float, say) -> EngineRanks:
    """The ranks of the cluster picked by profile / cluster_id / connection_file (default: ipcluster's
    default profile). With none running and start=True, a local one of n MPI engines (default: the
    layout() of this machine's cores for a model of model_bytes(), asked only then) is started, and
    stopped again when the ranks are closed."""
    import ipyparallel as ipp

    if connection_file is not None:
        if not Path(connection_file).exists():
            raise LlaisysError(f"{connection_file}: connection file not found")
        return EngineRanks(ipp.Client(connection_file), timeout=timeout)
    cluster, owned = _running_cluster(profile, cluster_id), False
    if cluster is None:
        if not start:
            raise LlaisysError(f"no cluster is running for profile {profile or 'default'!r}")
        cores = len(os.sched_getaffinity(0))
        ranks, threads = layout(cores, n, model_bytes() if model_bytes and n is None else None)
        say(f"no cluster running; starting one of {counted(ranks, 'MPI engine')} x {counted(threads, 'thread')} on this machine's "
            f"{cores} cores" + ("" if n else " (-n N chooses the engines)"))
        cluster, owned = _start_cluster(profile, cluster_id, ranks, threads, timeout), True
    try:
        client = cluster.connect_client_sync()
    except Exception as e:
        _stop_if_owned(cluster, owned)
        raise LlaisysError(f"cannot connect to the cluster ({e})") from None
    try:
        return EngineRanks(client, cluster, owned, timeout=timeout)
    except BaseException:
        client.close()
        _stop_if_owned(cluster, owned)
        raise


# Models whose weights, as they run, take less than this decode as fast or faster on engines of 4
# threads (measured: 404-639 MiB); between 1.0 and 1.2 GiB the two were within 10%, beyond, 8 ahead.
SMALL_MODEL_BYTES = 800 * 2**20


def layout(cores: int, ranks: int | None = None, model_bytes: int | None = None) -> tuple[int, int]:
    """(engines, threads per engine) for a cluster on this machine: the cores split evenly among the
    engines asked for; by default engines of up to 8 threads, or of up to 4 for a model under
    SMALL_MODEL_BYTES, and at least 2 engines where each can have 2 cores. On a 16-core machine
    (docs/benchmarks.md, "Layouts over three alternating rounds" and "At 843a452") the 0.5B shape in
    q8_0 and q4_0 (404-639 MiB) decoded faster at 4 x 4 than at 2 x 8 (q8_0 1.15-1.19x, q4_0
    1.01-1.29x) and the demo's Q4_K_M mix alike, while the 1.5B shape in q8_0 and bf16 (1.8-3.3 GiB)
    decoded faster at 2 x 8 (1.01-1.22x), and engines of 1 thread (16 x 1) were the slowest. On 2
    cores one engine of 2 threads decodes 1.03-1.05x and prefills 1.08-1.12x as fast as 2 x 1, both
    built-in models ("One engine on 2 cores")."""
    if ranks is None:
        most = 4 if model_bytes is not None and model_bytes < SMALL_MODEL_BYTES else 8
        ranks = max(min(2, cores // 2), -(-cores // most))
    return ranks, max(1, cores // ranks)


def _stop_if_owned(cluster, owned: bool) -> None:
    """Stop a cluster that this process started (after a failed connect)."""
    if owned:
        cluster.stop_cluster_sync()


def _running_cluster(profile, cluster_id):
    """The cluster ipcluster (or an earlier llaisys client) left a file for, if it is still alive."""
    import ipyparallel as ipp

    try:
        cluster = ipp.Cluster.from_file(profile=profile or "default", cluster_id=cluster_id or "", log_level=40)
    except FileNotFoundError:
        return None
    # A stale file from a cluster that is gone: ipyparallel drops a controller it finds not running.
    if cluster.controller is None:
        return None
    pid = getattr(cluster.controller, "pid", None)
    if pid is not None and not pid_alive(pid):
        return None
    return cluster


def _start_cluster(profile, cluster_id, n: int, threads: int, timeout: float):
    """A local cluster of n engines launched by mpiexec, each bound to `threads` cores of its own,
    stopped when this process exits."""
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
    elif threads > 1:
        args += ["--map-by", f"slot:PE={threads}", "--bind-to", "core"]  # the engines size their threads by it
    config.MPILauncher.mpi_args = args
    cluster = ipp.Cluster(engines="mpi", n=n, profile=profile or "default", cluster_id=cluster_id or "",
                          controller_args=["--HeartMonitor.period=500"], config=config, log_level=40,
                          engine_timeout=timeout)
    try:
        cluster.start_cluster_sync()
    except Exception as e:
        raise LlaisysError(f"could not start a cluster ({e})") from None
    return cluster
