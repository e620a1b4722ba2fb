"""Memory and time of loading the demo: resident memory once loaded and its peak while loading, per
rank, for each format and for 1 and 2 ranks (tests/load_memory.py does the loading under mpiexec).

Formats: the GGUF in its own types, the GGUF packed as bf16, and bf16 safetensors of the demo's
shapes (bench/random_model.py writes them: memory does not depend on the values). Also the peak of
preparing a GGUF's folder (metadata only: the tensors are read in place). With --old CHECKOUT (an
older checkout with its extension built in place), `llaisys-generate` of one token on the demo runs
alternately with that package and this one: time and peak memory of the whole command, paired.

    .venv/bin/python bench/load_memory.py [--repetitions 3] [--old /path/to/old/checkout]
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
from random_model import make_random_model  # noqa: E402

from llaisys_chat.model.builtins import builtin_gguf, find_builtin  # noqa: E402
from llaisys_chat.model.files import resolve_model  # noqa: E402

SCRIPT = Path(__file__).parent.parent / "tests" / "load_memory.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
MB = 1 << 20


def load(model, weights: str, ranks: int) -> dict:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    cmd = [MPIEXEC, "-n", str(ranks), "--oversubscribe", sys.executable, SCRIPT, str(model), weights]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def one_token(pythonpath: str | None) -> tuple[float, float]:
    """(seconds, peak MiB) of `llaisys-generate` of one token on the demo, with that package."""
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    cmd = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "llaisys_chat.generate", "--model", "demo",
           "--prompt", "hi", "--max-new-tokens", "1", "--threads", "1", "--json"]
    # From a folder holding no llaisys_chat: `python -m` puts the working folder ahead of PYTHONPATH.
    err = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=tempfile.gettempdir()).stderr
    seconds, kib = err.strip().splitlines()[-1].split()
    return float(seconds), int(kib) / 1024


def folder_peak(gguf: Path) -> int:
    """Peak resident memory of preparing a GGUF's folder from scratch. Measured by /usr/bin/time, not
    the child's own getrusage: a forked child starts from its parent's high-water mark, and this
    process has held a whole random model."""
    code = "import sys, pathlib\nfrom llaisys_chat.model.files import gguf_folder\ngguf_folder(pathlib.Path(sys.argv[1]))"
    with tempfile.TemporaryDirectory() as home:
        err = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", code, gguf], capture_output=True,
                             text=True, check=True, env={**os.environ, "LLAISYS_HOME": home}).stderr
    return int(err.strip().splitlines()[-1]) * 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--old", help="an older checkout (extension built in place) to time alongside")
    args = p.parse_args()
    demo = resolve_model("demo")
    with tempfile.TemporaryDirectory() as tmp:
        safetensors = make_random_model(demo, Path(tmp) / "random-bf16")
        cases = [("GGUF, own types", demo, "auto"), ("GGUF, packed as bf16", demo, "bf16"),
                 ("bf16 safetensors", safetensors, "auto")]
        rows = []
        for name, model, weights in cases:
            for ranks in (1, 2):
                runs = [load(model, weights, ranks) for _ in range(args.repetitions)]
                for r in range(ranks):
                    steady = statistics.median(run["ranks"][r]["steady_rss"] for run in runs) / MB
                    peak = statistics.median(run["ranks"][r]["peak_rss"] for run in runs) / MB
                    seconds = statistics.median(run["ranks"][r]["load_seconds"] for run in runs)
                    weight = runs[0]["ranks"][r]["weight_bytes"] / MB
                    rows.append([name, ranks, r, weight, steady, peak, peak / steady, peak - 1.15 * steady, seconds])
    print(f"Machine: {machine()}; medians of {args.repetitions} loads")
    print(table(["format", "ranks", "rank", "weights MiB", "RSS loaded MiB", "peak RSS MiB", "peak / loaded",
                 "peak - 1.15 x loaded (MiB)", "load s"], rows))
    print(f"Preparing the demo GGUF's folder (metadata, tokenizer): peak RSS {folder_peak(builtin_gguf(find_builtin('demo'))) / MB:.0f} MiB")
    if args.old:
        runs = {"old: " + args.old: [], "this one": []}
        for _ in range(args.repetitions):
            runs["old: " + args.old].append(one_token(args.old))
            runs["this one"].append(one_token(None))
        print(table(["llaisys-generate of one token on the demo", "seconds (median)", "peak RSS MiB (median)"],
                    [[label, statistics.median(s for s, _ in r), statistics.median(m for _, m in r)]
                     for label, r in runs.items()]))

if __name__ == "__main__":
    main()
