"""A short soak on the real cluster (bench/soak.py runs 200 turns): conversations taking turns with
caches evicted, replies stopped and retried; memory stays flat and greedy replies equal a fresh
single-process engine's."""
from soak import fresh_replies, soak

from llaisys_chat.engine import Engine

MiB = 1 << 20


def test_turns_with_evictions_stops_and_retries(demo_client, demo_folder):
    demo_client.load("demo", cache_slots=2)
    try:
        run = soak(demo_client, turns=30, sessions=3, max_new_tokens=16, sample_every=5)
    finally:
        demo_client.load("demo")
    assert run.turns == 30 and run.stopped == 4 and run.retried > 0
    # After the first rounds every cache slot has been used: from then on memory does not grow.
    settled = dict(run.rss)[10]
    assert all(end - start < 40 * MiB for start, end in zip(settled, run.rss[-1][1])), run.rss
    same = fresh_replies(Engine(demo_folder, threads=2), run, max_new_tokens=16)
    assert len(same) >= 5 and all(same), same
