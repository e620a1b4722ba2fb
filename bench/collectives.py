"""Run under mpiexec: the cost of one step's collectives for a model's shapes, in microseconds, through
the engine's own all-reduce hook: over MPI, and through the shared segment where the ranks share a host.

Per step the engine makes one f32 all-reduce for the vocab-parallel embedding and 2 per layer
(attention and MLP outputs: i64 in exact mode, f32 in fast mode), each of tokens x hidden values;
a decode step then agrees on the token with one MAXLOC. argv: hidden_size n_layer [tokens [repetitions]].
Rank 0 prints JSON {"mpi": {"exact": us, "fast": us}, "shared": {...}} ("shared" only on one host).
"""
import json
import sys
import time

import numpy as np
from mpi4py import MPI

from llaisys_chat import _native
from llaisys_chat.engine.collectives import MPIGroup

hidden, layers = int(sys.argv[1]), int(sys.argv[2])
tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 1
repetitions = int(sys.argv[4]) if len(sys.argv) > 4 else 200
group = MPIGroup()
comm = group.comm
pair = np.zeros(1, dtype=[("value", np.float32), ("index", np.int32)])


def step(all_reduce, dtype) -> None:
    embedding, partial = np.ones((tokens, hidden), np.float32), np.ones((tokens, hidden), dtype)
    all_reduce(embedding)
    for _ in range(2 * layers):
        all_reduce(partial)
    comm.Allreduce(MPI.IN_PLACE, [pair, MPI.FLOAT_INT], op=MPI.MAXLOC)


hooks = {}
handles = group.native_mpi()
if handles.shared is not None:
    hooks["shared"] = _native.AllReduce(handles)
handles.shared = None
hooks["mpi"] = _native.AllReduce(handles)
costs = {}
for path, all_reduce in hooks.items():
    costs[path] = {}
    for mode, dtype in (("exact", np.int64), ("fast", np.float32)):
        for _ in range(max(2, repetitions // 10)):
            step(all_reduce, dtype)
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(repetitions):
            step(all_reduce, dtype)
        costs[path][mode] = (time.perf_counter() - start) / repetitions * 1e6
if comm.Get_rank() == 0:
    print(json.dumps(costs))
