"""Decode speed through the cluster (ipyparallel + zmq streaming) against the same decode under mpiexec.

Starts a local two-engine MPI cluster and generates the same greedy reply three ways, in turn:
through cluster.generate(stream=True); inside the same engines without the client plumbing (no
streaming, no stop checks); and with bench/mpi_decode.py on two bare mpiexec ranks. Prints decode
tokens/s, time to first token and the streaming delay (engine chose a token -> the client has it).

    .venv/bin/python bench/cluster_speed.py [--ranks 2] [--repetitions 5] [--tokens 128]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table  # noqa: E402

PROMPT = "Write a long, detailed essay about the history of parallel computing."


def bare_mpiexec(ranks: int, tokens: int, repetitions: int) -> list[dict]:
    bin_dir = Path(sys.executable).parent
    cmd = [bin_dir / "mpiexec", "-n", str(ranks), "--bind-to", "core", sys.executable,
           Path(__file__).parent / "mpi_decode.py", "demo", PROMPT, str(tokens), str(repetitions)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def in_engines(prompt: str, tokens: int) -> float:
    """Runs on the engines: the same reply with the loaded engine, without streaming to a client."""
    from llaisys_chat.engine import worker
    from llaisys_chat.generate import generate

    engine = worker.loaded_engine()
    engine.drop_cache("default")
    return generate(prompt, engine=engine, max_new_tokens=tokens).stats.decode_tokens_per_s


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repetitions", type=int, default=10)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    os.environ["IPYTHONDIR"] = tempfile.mkdtemp(prefix="llaisys-bench-")  # a private cluster

    from llaisys_chat import cluster

    client = cluster.connect("demo", n=args.ranks, quiet=True, threads=1)
    via_cluster, inside, bare, ttft, delays = [], [], [], [], []
    try:
        client.generate(PROMPT, max_new_tokens=args.tokens)  # warm-up, as for the bare runs
        for _ in range(args.repetitions):
            client.drop_session("default")
            stream = client.generate(PROMPT, max_new_tokens=args.tokens, stream=True)
            for _piece in stream:
                pass
            via_cluster.append(stream.reply.stats.decode_tokens_per_s)
            ttft.append(stream.first_piece_seconds)
            delays += stream.delays
            inside.append(client.run_on_ranks(in_engines, PROMPT, args.tokens, timeout=600)[0])
            bare.append(bare_mpiexec(args.ranks, args.tokens, 2)[-1]["decode_tokens_per_s"])  # the first warms up
    finally:
        client.close()
    delays.sort()
    # This machine's memory bandwidth drifts over seconds: each row's ratio is the median over
    # repetitions of (its run / the bare run right after it).
    def paired(runs):
        return statistics.median(r / b for r, b in zip(runs, bare))

    print(f"Machine: {machine()}; {args.ranks} ranks x 1 thread; demo model, greedy, {args.tokens} new tokens; "
          f"medians of {args.repetitions} rounds")
    print(table(["path", "decode tok/s", "ratio to bare mpiexec (paired)", "time to first token (ms)",
                 "stream delay p50 (ms)", "stream delay p95 (ms)"],
                [["bare mpiexec", statistics.median(bare), 1.0, "", "", ""],
                 ["inside the cluster's engines, no client", statistics.median(inside), paired(inside), "", "", ""],
                 ["cluster.generate(stream=True)", statistics.median(via_cluster), paired(via_cluster),
                  1000 * statistics.median(ttft), 1000 * delays[len(delays) // 2],
                  1000 * delays[int(len(delays) * 0.95)]]]))
    print(f"Streaming plumbing: cluster.generate / in-engine decode = "
          f"{statistics.median(c / i for c, i in zip(via_cluster, inside)):.3f} (paired median)")


if __name__ == "__main__":
    main()
