"""Decode over several hosts joined by rate-limited links (tests/virtual_hosts.py: network namespaces on
this machine, one core each, every link a `tc tbf` link of the given rate both ways).

For each number of hosts (one rank each) and link rate it runs bench/mpi_decode.py through mpiexec
on the hosts twice, with 16 and with 80 new tokens, and reads each host's link counters around both
runs: the difference over the 64 extra tokens is the decode traffic per token, free of start-up and
prefill. It also times one decode step's collectives alone (bench/collectives.py) over the same
links. Reference in the same run: the same ranks on one host (shared memory) and one rank alone.

    .venv/bin/python bench/hosts.py [--hosts 2 3] [--rates none 10gbit 1gbit 100mbit] [--rounds 2] [--model demo]
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
sys.path.insert(0, str(HERE.parent / "tests"))
from common import machine, table  # noqa: E402
from virtual_hosts import VirtualHosts, unavailable  # noqa: E402

from llaisys_chat.model.config import ModelConfig  # noqa: E402
from llaisys_chat.model.files import resolve_model  # noqa: E402

PROMPT = "Write a long, detailed essay about the history of parallel computing."
SHORT, LONG = 16, 80
ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def run_json(argv: list, timeout: float = 600) -> dict:
    """The last JSON line that a command printed."""
    done = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, **ROOT_ENV})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv[-6:]))} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def decode(launch: list, model: str, tokens: int) -> dict:
    """One greedy reply of `tokens` new tokens from ranks started by `launch` (mpiexec and its placement)."""
    reply = run_json([*launch, sys.executable, HERE / "mpi_decode.py", model, PROMPT, tokens, 1])
    if reply["new_tokens"] != tokens:
        raise SystemExit(f"the reply ended after {reply['new_tokens']} tokens, not {tokens}")
    return reply


def collectives_ms(launch: list, config: ModelConfig) -> float:
    """One decode step's collectives alone (exact reduction), in ms."""
    costs = run_json([*launch, sys.executable, HERE / "collectives.py", config.hidden_size, config.num_hidden_layers, 50])
    return costs["exact"] / 1000


def over_hosts(vh: VirtualHosts, model: str, config: ModelConfig, ranks: int) -> dict:
    """Decode tokens/s, decode bytes per token sent by each engine host, and the collectives' time."""
    launch = vh.client.command([Path(sys.executable).parent / "mpiexec", *vh.mpi_args(), "-n", ranks], ROOT_ENV)
    sent = [vh.link_bytes()]
    decode(launch, model, SHORT)
    sent.append(vh.link_bytes())
    reply = decode(launch, model, LONG)
    sent.append(vh.link_bytes())
    per_token = [((sent[2][h.name] - sent[1][h.name]) - (sent[1][h.name] - sent[0][h.name])) / (LONG - SHORT)
                 for h in vh.nodes]
    return {"tok_s": reply["decode_tokens_per_s"], "bytes": max(per_token), "collectives_ms": collectives_ms(launch, config)}


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, nargs="+", default=[2, 3])
    p.add_argument("--rates", nargs="+", default=["none", "10gbit", "1gbit", "100mbit"])
    p.add_argument("--model", default="demo")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if (why := unavailable()) is not None:
        raise SystemExit(why)
    model = str(resolve_model(args.model))
    config = ModelConfig.from_file(Path(model) / "config.json")
    local = [Path(sys.executable).parent / "mpiexec", "--oversubscribe", "--bind-to", "none", "-n"]
    runs: dict[tuple, list[dict]] = {}  # (hosts, rate) -> one result per round
    for hosts in args.hosts:
        with VirtualHosts(engine_hosts=hosts) as vh:
            for _ in range(args.rounds):  # rates alternate within each round: the machine drifts
                runs.setdefault((hosts, "one host"), []).append({"tok_s": decode([*local, hosts], model, LONG)["decode_tokens_per_s"]})
                runs.setdefault((1, "one rank"), []).append({"tok_s": decode([*local, 1], model, LONG)["decode_tokens_per_s"]})
                for rate in args.rates:
                    vh.limit(None if rate == "none" else rate)
                    runs.setdefault((hosts, rate), []).append(over_hosts(vh, model, config, hosts))
                    print((hosts, rate), runs[(hosts, rate)][-1], flush=True)
    one = median(runs[(1, "one rank")], "tok_s")
    rows = []
    for (hosts, rate), results in runs.items():
        if rate in ("one host", "one rank"):
            continue
        tok_s = median(results, "tok_s")
        rows.append([hosts, rate, tok_s, median(runs[(hosts, "one host")], "tok_s"), one, tok_s / one,
                     median(results, "bytes") / 1024, median(results, "collectives_ms")])
    print(f"\nMachine: {machine()}; model {args.model}, exact reduction, greedy, {LONG - SHORT} decode tokens, medians of {args.rounds} rounds")
    print(table(["hosts", "link", "decode tok/s", "same ranks on one host", "1 rank", "vs 1 rank",
                 "KiB sent per host per token", "collectives ms/token"], rows))


if __name__ == "__main__":
    main()
