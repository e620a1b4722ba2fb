"""Run under mpiexec: several replies from one loaded engine; rank 0 prints their token ids as JSON,
and whether every rank ended with the same ids.

argv[1] is {"model": ..., "reduction": "exact"|"fast", "weights": ..., "runs": [generate() keyword arguments, ...]}.
"""
import json
import sys

from llaisys_chat.engine import Engine
from llaisys_chat.engine.collectives import default_group
from llaisys_chat.generate import generate

spec = json.loads(sys.argv[1])
group = default_group()
engine = Engine(spec["model"], group=group, threads=1, reduction=spec.get("reduction", "exact"),
                weights=spec.get("weights", "auto"))
tokens = [generate(engine=engine, **run).new_ids for run in spec["runs"]]
every_rank = group.allgather(tokens)
if group.rank == 0:
    print(json.dumps({"ranks": group.size, "tokens": tokens, "ranks_agree": all(t == tokens for t in every_rank),
                      "info": engine.info()}))
