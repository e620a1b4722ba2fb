"""The ranks that hold one model between them: a single process, or the ranks of an MPI communicator.

Both offer the same few collectives, so the engine runs one code path for any number of ranks.
"""
import os
import uuid

import numpy as np

from .. import _native
from ..errors import LlaisysError

# Environment variables that MPI launchers (Open MPI, MPICH/Hydra, PMIx) set in every rank.
_MPI_LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
_TRANSFER_TAG = 7


class SingleProcess:
    """One process holding the whole model: every collective is the identity."""

    rank, size = 0, 1

    def native_mpi(self) -> None:
        """Nothing to join: the native model runs without an all-reduce."""
        return None

    def maxloc(self, value: float, index: int) -> tuple[float, int]:
        """(largest value, its index) over ranks; ties go to the lowest index."""
        return value, index

    def max(self, value: float) -> float:
        """Largest value over ranks."""
        return value

    def sum_int(self, value: int) -> int:
        """Exact integer sum over ranks."""
        return value

    def allgather(self, obj) -> list:
        """Every rank's object, in rank order."""
        return [obj]

    def bcast(self, obj):
        """Rank 0's object, on every rank."""
        return obj


class MPIGroup(SingleProcess):
    """The ranks of an MPI communicator (COMM_WORLD unless one is given)."""

    def __init__(self, comm=None):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._pair = np.zeros(1, dtype=[("value", np.float32), ("index", np.int32)])

    def native_mpi(self) -> "_native.MpiHandles":
        """Handles for the native model's all-reduce: MPI_Allreduce's address and this communicator's
        handles, so that the engine calls MPI directly (no Python, no GIL, no MPI build dependency);
        and where all ranks share one host, a memory segment they all map, which the engine then
        reduces through instead (native/shared_all_reduce.hpp). Collective."""
        MPI = self._mpi
        handles = _native.MpiHandles(allreduce=_mpi_allreduce_address(), comm=MPI._handleof(self.comm),
                                     f32=MPI._handleof(MPI.FLOAT), i64=MPI._handleof(MPI.INT64_T),
                                     sum=MPI._handleof(MPI.SUM), rank=self.rank, ranks=self.size)
        handles.shared = self._shared_segment()
        return handles

    def _shared_segment(self) -> "_native.SharedSegment | None":
        """A zero-filled file in /dev/shm that every rank has mapped, when all ranks share one host
        (and LLAISYS_REDUCE is not "mpi"); else, or if any rank could not map it, None. Rank 0
        removes the file as soon as all have mapped it, so none is left behind."""
        MPI = self._mpi
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        one_host = node.Get_size() == self.size
        node.Free()
        if self.size == 1 or not one_host or os.environ.get("LLAISYS_REDUCE") == "mpi":
            return None
        nbytes = _native.SharedSegment.bytes_for(self.size)
        path, fd = _new_segment_file(nbytes) if self.rank == 0 else (None, -1)
        path = self.comm.bcast(path, root=0)
        if path is None:
            return None
        segment = None
        try:
            if self.rank != 0:
                fd = os.open(path, os.O_RDWR)
            segment = _native.SharedSegment(fd, nbytes)
        except (OSError, RuntimeError):  # the native mapping failed
            pass
        finally:
            if fd >= 0:
                os.close(fd)
        self.comm.Barrier()
        if self.rank == 0:
            os.unlink(path)
        return segment if self.comm.allreduce(segment is not None, op=MPI.LAND) else None

    def maxloc(self, value: float, index: int) -> tuple[float, int]:
        self._pair[0] = (value, index)
        self.comm.Allreduce(self._mpi.IN_PLACE, [self._pair, self._mpi.FLOAT_INT], op=self._mpi.MAXLOC)
        return float(self._pair[0]["value"]), int(self._pair[0]["index"])

    def max(self, value: float) -> float:
        return self.comm.allreduce(value, op=self._mpi.MAX)

    def sum_int(self, value: int) -> int:
        return self.comm.allreduce(int(value), op=self._mpi.SUM)

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    # Point to point, for moving model slices to ranks that lack the files (model_transfer.py).
    def send(self, obj, dest: int) -> None:
        """A small Python object to one rank."""
        self.comm.send(obj, dest=dest, tag=_TRANSFER_TAG)

    def recv(self, source: int):
        return self.comm.recv(source=source, tag=_TRANSFER_TAG)

    def send_array(self, array: np.ndarray, dest: int) -> None:
        """A contiguous array's bytes to one rank (no pickling, no copy)."""
        self.comm.Send([array.reshape(-1).view(np.uint8), self._mpi.BYTE], dest=dest, tag=_TRANSFER_TAG)

    def recv_array(self, out: np.ndarray, source: int) -> np.ndarray:
        """Into `out`, which has the sent array's shape and type."""
        self.comm.Recv([out.reshape(-1).view(np.uint8), self._mpi.BYTE], source=source, tag=_TRANSFER_TAG)
        return out


def _new_segment_file(nbytes: int) -> tuple[str | None, int]:
    """A new zero-filled file of nbytes in /dev/shm, open: (path, fd), or (None, -1) if it cannot be had.
    Its space is reserved, not just sized: a full /dev/shm (a container's is often 64 MB) fails here,
    and the ranks use MPI, instead of raising SIGBUS at the first touch of a page."""
    path, fd = f"/dev/shm/llaisys-reduce-{os.getpid()}-{uuid.uuid4().hex}", -1
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.posix_fallocate(fd, 0, nbytes)
        return path, fd
    except OSError:
        if fd >= 0:
            os.close(fd)
            os.unlink(path)
        return None, -1


def _mpi_allreduce_address() -> int:
    """Address of MPI_Allreduce in the MPI library this process has loaded (through mpi4py)."""
    import ctypes

    libraries = {line.split()[-1] for line in open("/proc/self/maps") if "/libmpi" in line}
    for path in sorted(libraries):
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
            return ctypes.cast(library.MPI_Allreduce, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    raise LlaisysError("cannot find MPI_Allreduce in the MPI library loaded by mpi4py")


def launched_by_mpi() -> bool:
    """Whether this process was started by mpiexec/mpirun with more than one rank possible."""
    return any(v in os.environ for v in _MPI_LAUNCH_VARS)


def default_group():
    """MPI's COMM_WORLD when launched by an MPI launcher with several ranks, else a single process."""
    if launched_by_mpi():
        group = MPIGroup()
        if group.size > 1:
            return group
    return SingleProcess()


def raise_if_any_failed(group, error: BaseException | None) -> None:
    """Collective: every rank raises if any rank failed (e.g. to load), so no rank is left waiting."""
    if error is None:
        message = None
    elif isinstance(error, LlaisysError):
        message = str(error)
    else:
        message = f"{type(error).__name__}: {error}"
    failures = [(rank, m) for rank, m in enumerate(group.allgather(message)) if m is not None]
    if failures:
        rank, first = failures[0]
        where = f"rank {rank}: " if group.size > 1 else ""
        raise LlaisysError(f"{where}{first}") from error
