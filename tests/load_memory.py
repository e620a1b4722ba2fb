"""Run alone or under mpiexec: load a model, then generate a few tokens; rank 0 prints one JSON line
with every rank's resident memory once loaded, its peak while loading (VmHWM, read before
generating), its packed weight bytes and the tokens.

argv: MODEL [WEIGHTS]
"""
import json
import sys
import time
from pathlib import Path

from llaisys_chat.engine import Engine
from llaisys_chat.engine.collectives import default_group
from llaisys_chat.generate import generate


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


group = default_group()
start = time.perf_counter()
engine = Engine(sys.argv[1], group=group, threads=1, weights=sys.argv[2] if len(sys.argv) > 2 else "auto",
                max_context=256)
mine = {"rank": group.rank, "load_seconds": time.perf_counter() - start, "steady_rss": status_bytes("VmRSS"),
        "peak_rss": status_bytes("VmHWM"), "weight_bytes": engine.model.weight_bytes}
tokens = generate("memory", engine=engine, max_new_tokens=8).new_ids
ranks = group.allgather(mine)
if group.rank == 0:
    print(json.dumps({"ranks": ranks, "tokens": tokens}))
