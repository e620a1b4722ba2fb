"""Engine speed against llama.cpp on the same CPU and the same (demo) weights in BF16.

Measures prefill of a 128-token prompt and decode of 128 tokens from an empty context (what
llama-bench calls pp128 and tg128) at 1 and 2 threads, and prints our/llama.cpp ratios.

    .venv/bin/python bench/engine_speed.py [--threads 1 2] [--repetitions 3]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table  # noqa: E402
from llama_cpp import llama_bench, same_weights_gguf  # noqa: E402

from llaisys_chat import _native  # noqa: E402
from llaisys_chat.engine import Engine  # noqa: E402
from llaisys_chat.model.builtins import builtin_gguf, find_builtin  # noqa: E402


def our_speeds(threads: int, n_prompt: int, n_decode: int, repetitions: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s): medians over repetitions, greedy, end-of-sequence ignored."""
    engine = Engine("demo", threads=threads, max_context=n_prompt + n_decode + 8)
    prompt = list(np.random.default_rng(0).integers(0, 150000, n_prompt))
    prefill, decode = [], []
    for _ in range(repetitions):
        cache = engine.model.new_cache(engine.max_context)
        start = time.perf_counter()
        engine.model.forward(cache, prompt)
        prefill.append(n_prompt / (time.perf_counter() - start))
        cache = engine.model.new_cache(engine.max_context)
        logits = engine.model.forward(cache, [prompt[0]])
        start = time.perf_counter()
        for _ in range(n_decode):
            logits = engine.model.forward(cache, [_native.argmax(logits[0])[1]])
        decode.append(n_decode / (time.perf_counter() - start))
    return statistics.median(prefill), statistics.median(decode)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repetitions", type=int, default=3)
    args = p.parse_args()
    reference = llama_bench(same_weights_gguf(builtin_gguf(find_builtin("demo")), "BF16"), args.threads, repetitions=args.repetitions)
    rows = []
    for t in args.threads:
        prefill, decode = our_speeds(t, 128, 128, args.repetitions)
        rows.append([t, prefill, reference[("prefill", t)], prefill / reference[("prefill", t)],
                     decode, reference[("decode", t)], decode / reference[("decode", t)]])
    print(f"Machine: {machine()}; kernels: {_native.build_info()['isa']}")
    print(table(["threads", "prefill tok/s", "llama.cpp prefill", "ratio", "decode tok/s", "llama.cpp decode", "ratio"], rows))


if __name__ == "__main__":
    main()
