"""Run under mpiexec: the cost of one decode step's collectives for a model's shapes, in microseconds.

Per token the engine makes 2 all-reduces per layer (attention and MLP outputs: i64 in exact mode,
f32 in fast mode), one f32 all-reduce for the vocab-parallel embedding, and one MAXLOC for the token.
argv: hidden_size n_layer [repetitions]. Rank 0 prints JSON {"exact": us, "fast": us}.
"""
import json
import sys
import time

import numpy as np
from mpi4py import MPI

hidden, layers = int(sys.argv[1]), int(sys.argv[2])
repetitions = int(sys.argv[3]) if len(sys.argv) > 3 else 200
comm = MPI.COMM_WORLD
pair = np.zeros(1, dtype=[("value", np.float32), ("index", np.int32)])


def step(dtype) -> None:
    partial, out = np.ones(hidden, dtype), np.empty(hidden, dtype)
    embedding, embedding_out = np.ones(hidden, np.float32), np.empty(hidden, np.float32)
    comm.Allreduce(embedding, embedding_out, op=MPI.SUM)
    for _ in range(2 * layers):
        comm.Allreduce(partial, out, op=MPI.SUM)
    comm.Allreduce(MPI.IN_PLACE, [pair, MPI.FLOAT_INT], op=MPI.MAXLOC)


costs = {}
for mode, dtype in (("exact", np.int64), ("fast", np.float32)):
    for _ in range(20):
        step(dtype)
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(repetitions):
        step(dtype)
    costs[mode] = (time.perf_counter() - start) / repetitions * 1e6
if comm.Get_rank() == 0:
    print(json.dumps(costs))
