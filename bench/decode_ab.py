"""Decode speed of this tree's engine against another revision's, on one model, runs alternating.

A change to a decode kernel moves tokens/s by a few percent, while this machine's memory drifts by
more within minutes: only runs that alternate, each build in a fresh process, compare. The other
revision is built in a worktree first:

    git worktree add /tmp/base REV
    (venv=$PWD/.venv && cd /tmp/base && $venv/bin/python setup.py build_ext --inplace)
    .venv/bin/python bench/decode_ab.py /tmp/base MODEL [--weights auto] [--threads 1 2] [--rounds 3]

MODEL is anything Engine takes (a built-in name, a folder, a .gguf). Each run decodes 3 x 128 tokens
greedily after a one-token prompt and reports the median of the three; the table gives each
round's figures, their medians and the ratio of the medians.
"""
import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table  # noqa: E402

THIS_TREE = Path(__file__).resolve().parent.parent
TOKENS = 128

# Run in the tree being timed (its llaisys_chat first on the path), with this tree's bench helpers.
ONE_RUN = """
import statistics, sys
sys.path.insert(0, {bench!r})
from common import greedy_decode_speed
from llaisys_chat.engine import Engine
engine = Engine(sys.argv[1], weights=sys.argv[2], threads=int(sys.argv[3]), max_context=2 * {tokens})
print(statistics.median(greedy_decode_speed(engine, [1], {tokens}) for _ in range(3)))
""".format(bench=str(Path(__file__).resolve().parent), tokens=TOKENS)


def one_run(tree: Path, model: str, weights: str, threads: int) -> float:
    """Decode tokens/s of the engine built in `tree`, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", ONE_RUN, model, weights, str(threads)], capture_output=True, text=True,
                          env=env, cwd=tree, check=True)
    return float(done.stdout.split()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other", type=Path, help="a tree of another revision, its extension built in place")
    p.add_argument("model")
    p.add_argument("--weights", default="auto")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rows = []
    for threads in args.threads:
        this, other = [], []
        for _ in range(args.rounds):
            other.append(one_run(args.other.resolve(), args.model, args.weights, threads))
            this.append(one_run(THIS_TREE, args.model, args.weights, threads))
        a, b = statistics.median(this), statistics.median(other)
        rows.append([threads, ", ".join(f"{v:.1f}" for v in other), b, ", ".join(f"{v:.1f}" for v in this), a, a / b])
    print(f"Machine: {machine()}; {args.model} ({args.weights}); decode tok/s, rounds alternating")
    print(table(["threads", f"{args.other.resolve().name} (rounds)", "median", "this tree (rounds)", "median", "ratio"], rows))


if __name__ == "__main__":
    main()
