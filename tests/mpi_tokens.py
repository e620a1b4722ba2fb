"""Run under mpiexec: several replies from one loaded engine; rank 0 prints their token ids as JSON,
and whether every rank ended with the same ids.

argv[1] is {"model": ..., "reduction": "exact"|"fast", "weights": ..., "runs": [generate() keyword arguments, ...],
"batched": bool}; batched runs decode together (engine.Batch), the later ones joining as the first run.
"""
import json
import sys

from llaisys_chat.engine import Engine
from llaisys_chat.engine.collectives import default_group
from llaisys_chat.engine.engine import Batch
from llaisys_chat.generate import generate
from llaisys_chat.protocol.messages import build_messages
from llaisys_chat.protocol.sampling import SamplingParams


def batched(engine, runs) -> list[list[int]]:
    """The runs decoded together: two start at once, the others join one step apart."""
    batch, replies = Batch(engine, max_running=3), []
    for i, run in enumerate(runs):
        sampling = SamplingParams(**{k: run[k] for k in ("temperature", "top_k", "top_p", "seed") if k in run})
        reply = engine.reply(build_messages(run["prompt"], None), sampling, max_new_tokens=run["max_new_tokens"],
                             cache_key=None, busy=batch.cache_keys())
        batch.add(reply)
        replies.append(reply)
        if i >= 1:
            batch.step()
    while batch:
        batch.step()
    return [r.tokens for r in replies]


spec = json.loads(sys.argv[1])
group = default_group()
engine = Engine(spec["model"], group=group, threads=1, reduction=spec.get("reduction", "exact"),
                weights=spec.get("weights", "auto"))
if spec.get("batched"):
    tokens = batched(engine, spec["runs"])
else:
    tokens = [generate(engine=engine, **run).new_ids for run in spec["runs"]]
every_rank = group.allgather(tokens)
if group.rank == 0:
    print(json.dumps({"ranks": group.size, "tokens": tokens, "ranks_agree": all(t == tokens for t in every_rank),
                      "info": engine.info()}))
