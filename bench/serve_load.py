"""`llaisys-chat serve` under load: batched decoding against one request at a time, then a load test.

Starts the server on loopback with a private cluster of --ranks engines (the demo model), then:
1. Batching: one greedy request alone, then --batch different greedy requests at once, in
   alternating rounds. Decode tokens/s: text pieces (one per token, but for held-back text)
   arriving while every request of the round was decoding, from the last one's first piece to the
   first one's end, so that neither the prompts' prefill nor the ragged ends count; also
   end to end: all new tokens over the round's wall time, prefills included.
2. Load: --clients streaming clients for --seconds, each asking in turn from a set of prompts whose
   solo replies (greedy) were recorded first. Every reply must equal its solo run. Prints time to
   first token (p50/p95), total tokens/s, mismatches and errors.

    .venv/bin/python bench/serve_load.py [--ranks 2] [--rounds 3] [--batch 4] [--clients 8] [--seconds 120]
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table  # noqa: E402

PROMPTS = [
    "Write a long, detailed essay about the history of parallel computing.",
    "Explain in detail how a hash table works, with examples in Python.",
    "Describe the water cycle step by step, at length.",
    "Write a detailed tutorial on recursion with several code examples.",
    "Tell a long story about a robot who learns to paint.",
    "Explain the differences between TCP and UDP in depth.",
    "Write a thorough guide to writing unit tests in Python.",
    "Describe how a compiler turns source code into machine code, in detail.",
]


def start_server(ranks: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "IPYTHONDIR": tempfile.mkdtemp(prefix="llaisys-bench-"),  # a private cluster
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "llaisys-chat"), "serve", "--port", str(port),
                               "-n", str(ranks)], env=env, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return server, base
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            sys.exit("the server exited before it was up")
        time.sleep(0.5)
    sys.exit("the server did not come up within 600 s")


def stream(base: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion: its text, token count, and the arrival times of its pieces."""
    start, times, text, usage = time.monotonic(), [], "", None
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens,
            "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                text += piece
                times.append(time.monotonic())
            usage = chunk.get("usage") or usage
    return {"text": text, "tokens": usage["completion_tokens"], "start": start, "first": times[0], "last": times[-1],
            "times": times, "end": time.monotonic()}


def decode_rate(replies: list[dict]) -> float:
    """Pieces per second while every reply was decoding (after the last one's first piece, up to the
    first one's last)."""
    begin, end = max(r["first"] for r in replies), min(r["last"] for r in replies)
    return sum(sum(1 for t in r["times"] if begin < t <= end) for r in replies) / (end - begin)


def end_to_end_rate(replies: list[dict]) -> float:
    return sum(r["tokens"] for r in replies) / (max(r["end"] for r in replies) - min(r["start"] for r in replies))


def batching(base: str, rounds: int, batch: int, max_tokens: int) -> list[list]:
    runs = {"single": [], "together": []}
    with ThreadPoolExecutor(batch) as pool:
        for _ in range(rounds):
            runs["single"].append([stream(base, PROMPTS[0], max_tokens)])
            runs["together"].append(list(pool.map(lambda p: stream(base, p, max_tokens), PROMPTS[:batch])))
    rows = []
    for name, label in (("single", "1 request"), ("together", f"{batch} requests at once")):
        decode = [decode_rate(r) for r in runs[name]]
        whole = [end_to_end_rate(r) for r in runs[name]]
        ratio = [d / decode_rate(s) for d, s in zip(decode, runs["single"])]
        ratio_whole = [w / end_to_end_rate(s) for w, s in zip(whole, runs["single"])]
        rows.append([label, statistics.median(decode), statistics.median(ratio), statistics.median(whole),
                     statistics.median(ratio_whole)])
    return rows


def load(base: str, clients: int, seconds: float, max_tokens: int) -> list[list]:
    solo = {p: stream(base, p, max_tokens)["text"] for p in PROMPTS}
    stop_at = time.monotonic() + seconds

    def client(i: int) -> list[dict]:
        done, k = [], i
        while time.monotonic() < stop_at:
            prompt = PROMPTS[k % len(PROMPTS)]
            k += 1
            try:
                r = stream(base, prompt, max_tokens)
                done.append({**r, "ok": r["text"] == solo[prompt]})
            except Exception as e:  # counted, and shown
                print(f"client {i}: {type(e).__name__}: {e}", file=sys.stderr)
                done.append({"ok": False, "error": True})
        return done

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for per_client in pool.map(client, range(clients)) for r in per_client]
    wall = time.monotonic() - start
    good = [r for r in results if not r.get("error")]
    ttft = sorted(r["first"] - r["start"] for r in good)
    return [[clients, f"{wall:.0f}", len(results), sum(1 for r in results if r.get("error")),
             sum(1 for r in good if not r["ok"]), 1000 * ttft[len(ttft) // 2], 1000 * ttft[int(len(ttft) * 0.95)],
             sum(r["tokens"] for r in good) / wall]]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=120)
    args = p.parse_args()
    server, base = start_server(args.ranks)
    try:
        stream(base, PROMPTS[0], 8)  # warm-up
        batch_rows = batching(base, args.rounds, args.batch, args.max_tokens)
        load_rows = load(base, args.clients, args.seconds, args.max_tokens) if args.seconds > 0 else []
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    print(f"Machine: {machine()}; demo model; {args.ranks} ranks; greedy, up to {args.max_tokens} new tokens")
    print(f"\nBatched decoding (medians of {args.rounds} alternating rounds; ratio paired per round):")
    print(table(["requests", "decode tok/s (all decoding)", "ratio to 1 request", "end to end tok/s",
                 "ratio to 1 request"], batch_rows))
    if load_rows:
        print(f"\nLoad test ({args.clients} streaming clients, each reply checked against its solo run):")
        print(table(["clients", "seconds", "replies", "errors", "differing from solo", "TTFT p50 (ms)",
                     "TTFT p95 (ms)", "tokens/s (all clients)"], load_rows))


if __name__ == "__main__":
    main()
