"""Run under mpiexec: replies to one prompt straight from the engines (no cluster, no client).

argv: model prompt max_new_tokens repetitions [reduction [threads [weights [temperature]]]]. Greedy unless a
temperature is given (then sampled with seed 0, the same tokens every run). Rank 0 prints one JSON line per reply
with its stats and every rank's memory, so that other benchmarks can compare against the bare engine.
"""
import json
import sys

from llaisys_chat.engine import Engine
from llaisys_chat.engine.collectives import default_group
from llaisys_chat.generate import generate

model, prompt, max_new_tokens, repetitions = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
reduction = sys.argv[5] if len(sys.argv) > 5 else "exact"
threads = int(sys.argv[6]) if len(sys.argv) > 6 else 1
weights = sys.argv[7] if len(sys.argv) > 7 else "auto"
temperature = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
group = default_group()
engine = Engine(model, group=group, threads=threads, reduction=reduction, weights=weights)
for _ in range(repetitions):
    engine.drop_cache("default")  # a full prefill each time, as a fresh request would have
    reply = generate(prompt, engine=engine, max_new_tokens=max_new_tokens, temperature=temperature, seed=0)
    ranks = group.allgather(engine.info())
    if group.rank == 0:
        print(json.dumps({**reply.stats.to_dict(), "new_ids": reply.new_ids, "ranks": ranks}), flush=True)
