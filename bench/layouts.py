"""Decode speed of every layout of a machine's cores: ranks x threads per rank, for each weight type.

For each type, rounds alternate over the layouts (ranks = each power of two up to the cores, threads =
cores / ranks, each rank bound to its own cores; or those given as --layouts RxT) running
bench/mpi_decode.py under mpiexec: greedy decode of --tokens tokens after a ~220-token prompt (the
second of two replies), with the exact reduction or each of --reductions. Prints medians (prefill and
decode), each run's decode ratio to the best, and the weights' bytes all ranks read a second in decode
(against what bench/membw.py reads with as many streams: how close decode is to the memory's limit).

    python bench/layouts.py MODEL [--cores 16] [--layouts 8x1 16x1] [--reductions exact fast]
        [--weights bf16 q8_0 q4_0] [--tokens 64] [--rounds 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from common import machine, table  # noqa: E402

# 223 tokens with the chat template: the prefill compares with llama-bench's pp128 (and pp512).
PROMPT = "Write a long, detailed essay about the history of parallel computing. " + "Context: parallel " * 60


def decode(model: str, ranks: int, threads: int, weights: str, tokens: int, reduction: str) -> dict:
    """One run: prefill and decode tokens/s, and rank 0's resident memory."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec", "-n", str(ranks), "--map-by", f"slot:PE={threads}",
           "--bind-to", "core", sys.executable, str(HERE / "mpi_decode.py"), model, PROMPT, str(tokens), "2", reduction,
           str(threads), weights]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
                          env={**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{ranks} x {threads} {weights} {reduction} failed:\n{done.stderr[-3000:]}")
    # The second of two replies: the first also pays for touching fresh buffers (page faults).
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    step_bytes = sum(rank["decode_bytes"] for rank in reply["ranks"])  # weights all ranks read a token
    tok_s = reply["decode_tokens_per_s"]
    return {"tok_s": tok_s, "read_gb_s": step_bytes * tok_s / 1e9, "prefill": reply["prompt_tokens"] / reply["prefill_seconds"],
            "prompt": reply["prompt_tokens"], "rss": reply["ranks"][0]["rss_bytes"] / 2**20}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--layouts", nargs="+", help="ranks x threads, e.g. 8x1 (default: powers of two ranks)")
    p.add_argument("--reductions", nargs="+", default=["exact"], choices=["exact", "fast"])
    p.add_argument("--weights", nargs="+", default=["bf16", "q8_0", "q4_0"])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if args.layouts:
        layouts = [tuple(int(x) for x in layout.split("x")) for layout in args.layouts]
    else:
        layouts = [(r, args.cores // r) for r in (1, 2, 4, 8, 16, 32, 64) if r <= args.cores]
    rows = []
    for weights in args.weights:
        runs = {(ranks, threads, reduction): [] for ranks, threads in layouts for reduction in args.reductions}
        for _ in range(args.rounds):
            for ranks, threads, reduction in runs:  # the first layout fills the load-time quantization cache
                runs[(ranks, threads, reduction)].append(decode(args.model, ranks, threads, weights, args.tokens, reduction))
                print(weights, ranks, threads, reduction, runs[(ranks, threads, reduction)][-1], flush=True)
        speeds = {run: statistics.median(r["tok_s"] for r in results) for run, results in runs.items()}
        best = max(speeds.values())
        for (ranks, threads, reduction), results in runs.items():
            speed = speeds[(ranks, threads, reduction)]
            rows.append([weights, ranks, threads, reduction, speed, speed / best,
                         statistics.median(r["read_gb_s"] for r in results),
                         statistics.median(r["prefill"] for r in results), results[0]["prompt"],
                         statistics.median(r["rss"] for r in results)])
    print(f"\nMachine: {machine()}; model {args.model}; greedy decode of {args.tokens} tokens; "
          f"medians of {args.rounds} rounds")
    print(table(["weights", "ranks", "threads per rank", "reduction", "decode tok/s", "vs best", "weights read GB/s",
                 "prefill tok/s", "prompt tokens", "rank 0 RSS MiB"], rows))


if __name__ == "__main__":
    main()
