"""Run under mpiexec: the engine's all-reduce hook on its own, through the shared segment (where the
ranks share a host) and through MPI. Rank 0 prints JSON: which paths ran, the cases whose sums were
wrong, and the segment files left in /dev/shm (there should be none: rank 0 removes its file once
every rank has mapped it)."""
import glob
import json

import numpy as np

from llaisys_chat import _native
from llaisys_chat.engine.collectives import MPIGroup

group = MPIGroup()
handles = group.native_mpi()
hooks = {"shared": _native.AllReduce(handles)} if handles.shared is not None else {}
handles.shared = None
hooks["mpi"] = _native.AllReduce(handles)

# Sizes around a slot (1 MiB: 262144 f32, 131072 i64), so that large tensors go through in pieces.
wrong = []
for path, all_reduce in hooks.items():
    for dtype in (np.float32, np.int64):
        for n in (1, 7, 896, 262143, 262145, 600_001):
            parts = [(np.arange(n) % 1000 * (r + 1) - 3 * r).astype(dtype) / (7 if dtype == np.float32 else 1)
                     for r in range(group.size)]
            data = parts[group.rank].astype(dtype).copy()
            all_reduce(data)
            expected = parts[0].astype(dtype).copy()
            for part in parts[1:]:  # rank order, as the shared path adds them
                expected += part.astype(dtype)
            exact = path == "shared" or dtype == np.int64
            if not (np.array_equal(data, expected) if exact else np.allclose(data, expected, rtol=1e-5, atol=1e-3)):
                wrong.append([path, np.dtype(dtype).name, n])
left = group.allgather(sorted(glob.glob("/dev/shm/llaisys-reduce-*")))
if group.rank == 0:
    print(json.dumps({"paths": sorted(hooks), "wrong": wrong, "left": left}))
