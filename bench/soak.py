"""Soak: 200 chat turns over several conversations on a local two-engine MPI cluster, with more
conversations than the engines keep caches for (evictions), every 7th reply stopped part-way, every
11th retried, and conversations started again after 8 exchanges (tests/soak.py drives it). Prints
each rank's resident memory along the way and how many sampled greedy replies equal a fresh
single-process engine's reply to the same messages.

    .venv/bin/python bench/soak.py [--turns 200] [--sessions 6] [--ranks 2]
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import machine, table  # noqa: E402
from soak import fresh_replies, soak  # noqa: E402

from llaisys_chat import cluster  # noqa: E402
from llaisys_chat.engine import Engine  # noqa: E402

MiB = 1 << 20


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, default=200)
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    # A cluster of its own (started, then stopped), whatever else runs.
    client = cluster.connect("demo", cluster_id=f"soak-{os.getpid()}", n=args.ranks, quiet=True, threads=1)
    try:
        started = time.monotonic()
        run = soak(client, args.turns, args.sessions, max_new_tokens=args.max_new_tokens, rss_every=25,
                   report=lambda turn, rss: print(f"turn {turn}: {time.monotonic() - started:.0f} s, RSS MiB "
                                                  f"{' '.join(f'{b / MiB:.0f}' for b in rss)}", flush=True))
        seconds = time.monotonic() - started
        slots = client.info()["cache_slots"]
    finally:
        client.close()
    same = fresh_replies(Engine("demo", threads=2), run, args.max_new_tokens)
    print(f"Machine: {machine()}; {args.ranks} ranks, {args.sessions} conversations on {slots} cache slots, "
          f"{run.turns} turns ({run.stopped} stopped, {run.retried} retried, {run.resets} conversations started again, up to {args.max_new_tokens} new tokens "
          f"each) in {seconds:.0f} s")
    print(table(["after turn", *[f"rank {r} RSS MiB" for r in range(args.ranks)]],
                [[turn, *[b / MiB for b in rss]] for turn, rss in run.rss]))
    settled = dict(run.rss)[min(t for t, _ in run.rss if t >= args.turns // 4)]
    growth = [(end - start) / MiB for start, end in zip(settled, run.rss[-1][1])]
    print(f"Growth from turn {args.turns // 4} to the end, per rank: {', '.join(f'{g:+.1f} MiB' for g in growth)}")
    print(f"Sampled greedy replies equal to a fresh single-process engine's: {sum(same)} of {len(same)}")


if __name__ == "__main__":
    main()
