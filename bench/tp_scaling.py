"""Tensor-parallel scaling: decode tokens/s and per-rank memory for 1..N ranks of one thread each.

For each rank count it runs bench/mpi_decode.py under mpiexec (greedy, fixed prompt) with the exact
(fixed-point, N-independent) and the fast (f32) all-reduce, times one decode step's collectives
alone (bench/collectives.py), and repeats the 2-rank run with TCP forced (--mca btl self,tcp), a
stand-in for ranks on different hosts. With several --weights types, all of that runs for each.

    .venv/bin/python bench/tp_scaling.py --ranks 1 2 [--model demo] [--weights auto q8_0 q4_0 bf16]
        [--tokens 128] [--repetitions 3]
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table  # noqa: E402

from llaisys_chat.model.config import ModelConfig  # noqa: E402
from llaisys_chat.model.files import resolve_model  # noqa: E402

HERE = Path(__file__).parent
PROMPT = "Write a long, detailed essay about the history of parallel computing."
TCP = ["--mca", "btl", "self,tcp"]


def mpiexec(n: int, extra: list[str], *args) -> str:
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "mpiexec"), "-n", str(n), "--bind-to", "core", "--oversubscribe", *extra, sys.executable, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def memory_bandwidth(processes: int) -> str:
    """bench/membw.py's line: what the memory delivers right now to 1 and to N streaming processes."""
    return subprocess.run([sys.executable, HERE / "membw.py", str(processes)], capture_output=True, text=True,
                          check=True).stdout.strip()


def decode_run(n, model, tokens, repetitions, reduction, weights, extra) -> dict:
    lines = [json.loads(line) for line in mpiexec(n, extra, HERE / "mpi_decode.py", model, PROMPT, tokens,
                                                  repetitions + 1, reduction, 1, weights).splitlines()
             if line.startswith("{")]
    runs = lines[1:]  # the first reply warms caches and pages up
    return {"rate": statistics.median(r["decode_tokens_per_s"] for r in runs),
            "weights": max(r["weight_bytes"] for r in runs[-1]["ranks"]),
            "rss": max(r["rss_bytes"] for r in runs[-1]["ranks"]), "tokens": runs[-1]["new_ids"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default="demo")
    p.add_argument("--weights", nargs="+", default=["auto"], help="weight types (auto: the file's own)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    folder = resolve_model(args.model)
    config = ModelConfig.from_file(folder / "config.json")
    bandwidth = memory_bandwidth(max(args.ranks))
    rows, records = [], []
    runs = [(n, reduction, "shared memory", []) for n in args.ranks for reduction in ("exact", "fast")]
    if 2 in args.ranks:
        runs += [(2, "exact", "TCP", TCP)]
    for weights in args.weights:
        base = None
        for n, reduction, transport, extra in runs:
            result = decode_run(n, folder, args.tokens, args.repetitions, reduction, weights, extra)
            comm = json.loads(mpiexec(n, extra, HERE / "collectives.py", config.hidden_size, config.num_hidden_layers))
            base = base or result["rate"]
            step_us = 1e6 / result["rate"]
            rows.append([weights, n, reduction, transport, result["rate"], result["rate"] / base,
                         result["weights"] / 2**20, result["rss"] / 2**20, comm[reduction], 100 * comm[reduction] / step_us])
            records.append({"type": weights, "ranks": n, "reduction": reduction, "transport": transport, **result,
                            "collectives_us": comm})
    print(f"Machine: {machine()}; model {args.model} ({folder.name}); 1 thread per rank; greedy, {args.tokens} new "
          f"tokens; medians of {args.repetitions}")
    print(f"Before: {bandwidth}. After: {memory_bandwidth(max(args.ranks))}.")
    print(table(["weights", "ranks", "reduction", "transport", "decode tok/s", "speed-up vs 1 rank", "weights/rank MiB",
                 "RSS/rank MiB", "collectives us/token", "% of token time"], rows))
    for weights in args.weights:
        same = {json.dumps(r["tokens"]) for r in records if r["reduction"] == "exact" and r["type"] == weights}
        print(f"{weights}, exact reduction: {'identical' if len(same) == 1 else 'DIFFERENT'} tokens across all runs")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
