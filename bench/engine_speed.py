"""Engine speed against llama.cpp on the same CPU and the same GGUF file, for each weight type.

For each type (the demo's own Q4_K_M mix, and llama-quantize's BF16, Q8_0 and Q4_0 of it) and
thread count, rounds alternate between this engine and llama-bench on the very same file: prefill
of 128 and 512 tokens, and decode of 64 tokens from an empty context (llama-bench's pp / tg). The
table gives medians over rounds and the ratios; for decode it also gives the fraction of the read
bandwidth limit (bytes one decode step reads x tokens/s, over what bench/membw.py measured with as
many streams as threads, in the same run: memory on this VM drifts within minutes).

    .venv/bin/python bench/engine_speed.py [--types q4_k_m q8_0 q4_0 bf16] [--threads 1 2] [--rounds 3]
                                           [--model qwen2.5-coder:1.5b]

--model picks another built-in (default: the demo); q4_k_m then stands for that file's own mix.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import greedy_decode_speed, machine, table  # noqa: E402
from llama_cpp import llama_bench, same_weights_gguf  # noqa: E402
from membw import read_bandwidth  # noqa: E402

from llaisys_chat import _native  # noqa: E402
from llaisys_chat.engine import Engine  # noqa: E402
from llaisys_chat.model.builtins import builtin_gguf, find_builtin  # noqa: E402

PROMPTS = (128, 512)
DECODE = 64


def gguf_of(model: str, kind: str) -> Path:
    """A built-in's file itself (q4_k_m), or llama-quantize's re-encoding of it."""
    own = builtin_gguf(find_builtin(model))
    return own if kind == "q4_k_m" else same_weights_gguf(own, kind.upper())


def our_round(engine: Engine) -> dict:
    """One measurement of each test: {("prefill", n) or ("decode", DECODE): tokens/s}."""
    rng = np.random.default_rng(0)
    speeds = {}
    for n in PROMPTS:
        prompt = [int(t) for t in rng.integers(0, 150000, n)]
        cache = engine.model.new_cache(engine.max_context)
        start = time.perf_counter()
        engine.model.forward(cache, prompt)
        speeds[("prefill", n)] = n / (time.perf_counter() - start)
    speeds[("decode", DECODE)] = greedy_decode_speed(engine, [1], DECODE)
    return speeds


def llama_round(gguf: Path, threads: int) -> dict:
    """The same tests by llama-bench, one repetition each."""
    speeds = {}
    for n in PROMPTS:
        speeds[("prefill", n)] = llama_bench(gguf, [threads], prompt=n, generate=0, repetitions=1)[("prefill", threads)]
    speeds[("decode", DECODE)] = llama_bench(gguf, [threads], prompt=0, generate=DECODE, repetitions=1)[("decode", threads)]
    return speeds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", nargs="+", default=["q4_k_m", "q8_0", "q4_0", "bf16"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="demo", help="a built-in model's name")
    args = p.parse_args()
    rows = []
    for kind in args.types:
        gguf = gguf_of(args.model, kind)
        for threads in args.threads:
            engine = Engine(gguf, threads=threads, max_context=max(PROMPTS) + DECODE + 8)
            ours, theirs, bandwidth = [], [], []
            for _ in range(args.rounds):
                ours.append(our_round(engine))
                theirs.append(llama_round(gguf, threads))
                bandwidth.append(read_bandwidth(threads, seconds=0.5))
            decode_bytes = engine.model.decode_bytes
            del engine
            median = {key: (statistics.median(r[key] for r in ours), statistics.median(r[key] for r in theirs))
                      for key in ours[0]}
            limit = statistics.median(bandwidth) * 1e9 / decode_bytes
            us, them = median[("decode", DECODE)]
            row = [kind, threads]
            for n in PROMPTS:
                a, b = median[("prefill", n)]
                row += [a, b, a / b]
            rows.append(row + [us, them, us / them, statistics.median(bandwidth), us / limit, them / limit])
    print(f"Machine: {machine()}; model: {args.model}; kernels: {_native.build_info()['isa']}, AMX tiles: {_native.build_info()['amx']}; medians of {args.rounds} alternating rounds")
    headers = ["type", "threads"]
    for n in PROMPTS:
        headers += [f"pp{n} ours", f"pp{n} llama.cpp", "ratio"]
    headers += [f"tg{DECODE} ours", f"tg{DECODE} llama.cpp", "ratio", "read GB/s", "ours / bw limit", "llama.cpp / bw limit"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
