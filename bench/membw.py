"""This machine's memory read bandwidth right now, with 1 and with N processes streaming at once.

Decode speed is bound by it, and on a shared VM it drifts: the scaling benchmarks print it beside
their tables, so that a ratio can be read against what the memory allowed at the time.

    python bench/membw.py N      (prints one line)
    python bench/membw.py --sizes [N]   (GB/s by working-set size, shared by N processes (default 1):
                                         what the caches hold)
"""
import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # one core per process: before numpy loads OpenBLAS

import multiprocessing as mp  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ELEMENTS = 1 << 26  # two float32 arrays of 256 MiB per process: far beyond the caches


def _read_rate(a, b, seconds: float) -> float:
    """Bytes/s that dot products of a and b read, over `seconds`."""
    start, reads = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        np.dot(a, b)  # a BLAS dot product streams both arrays at the memory's pace
        reads += 1
    return reads * (a.nbytes + b.nbytes) / (time.perf_counter() - start)


def _stream(barrier, seconds, out, elements):
    a, b = np.ones(elements, np.float32), np.ones(elements, np.float32)
    np.dot(a, b)  # touch the pages first
    barrier.wait()
    out.put(_read_rate(a, b, seconds))


def read_bandwidth(processes: int, seconds: float = 1.0, mib: int = 0) -> float:
    """Total GB/s that `processes` processes read while reading at the same time: each streams its
    own 512 MiB, or rereads its share of a working set of `mib` MiB in all."""
    elements = ELEMENTS if mib == 0 else (mib << 17) // processes  # two float32 arrays a process
    barrier, out = mp.Barrier(processes), mp.Queue()
    workers = [mp.Process(target=_stream, args=(barrier, seconds, out, elements)) for _ in range(processes)]
    for w in workers:
        w.start()
    total = sum(out.get() for _ in workers)
    for w in workers:
        w.join()
    return total / 1e9


if __name__ == "__main__" and sys.argv[1:2] == ["--sizes"]:
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    print(f"| working set (MiB) | read GB/s, {n} process{'es' if n > 1 else ''} |\n|---:|---:|")
    for mib in (2, 16, 32, 64, 128, 192, 256, 384, 512):
        print(f"| {mib} | {read_bandwidth(n, mib=mib):.1f} |", flush=True)
elif __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    print(f"read bandwidth now: {read_bandwidth(1):.0f} GB/s with 1 process, {read_bandwidth(n):.0f} GB/s with {n}")
