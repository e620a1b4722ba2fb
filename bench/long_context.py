"""Decode speed after a long context, against llama.cpp at the same depth.

A chat's context grows with every turn, and each decode step attends over all of it. For each thread
count, rounds alternate between this engine (one process: a prompt of `depth` random tokens, then
--tokens greedy decode steps, timed) and `llama-bench -d depth -n tokens` on the same GGUF (the demo
file). Prints medians and their ratio.

    .venv/bin/python bench/long_context.py [--depths 0 1000 4000] [--threads 1 2] [--tokens 48] [--rounds 2]
"""
import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import greedy_decode_speed, machine, table  # noqa: E402
from llama_cpp import llama_bench  # noqa: E402

from llaisys_chat.engine import Engine  # noqa: E402
from llaisys_chat.model.builtins import builtin_gguf, find_builtin  # noqa: E402


def our_decode(engine: Engine, depth: int, tokens: int) -> float:
    """Decode tokens/s after a context of `depth` random tokens."""
    prompt = [int(t) for t in np.random.default_rng(depth).integers(0, 150000, depth)] + [1]
    return greedy_decode_speed(engine, prompt, tokens)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[0, 1000, 4000])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    gguf = builtin_gguf(find_builtin("demo"))
    rows = []
    for threads in args.threads:
        engine = Engine(gguf, threads=threads, max_context=max(args.depths) + args.tokens + 8)
        ours = {depth: [] for depth in args.depths}
        theirs = {depth: [] for depth in args.depths}
        for _ in range(args.rounds):
            for depth in args.depths:
                ours[depth].append(our_decode(engine, depth, args.tokens))
                theirs[depth].append(llama_bench(gguf, [threads], prompt=0, generate=args.tokens, repetitions=1,
                                                 depth=depth)[("decode", threads)])
        del engine
        for depth in args.depths:
            us, them = statistics.median(ours[depth]), statistics.median(theirs[depth])
            rows.append([threads, depth, us, them, us / them])
    print(f"Machine: {machine()}; demo model in its own types; decode of {args.tokens} tokens after the context; "
          f"medians of {args.rounds} alternating rounds")
    print(table(["threads", "context tokens", "ours tok/s", "llama.cpp tok/s", "ratio"], rows))


if __name__ == "__main__":
    main()
