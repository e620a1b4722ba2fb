"""Helpers shared by the benchmarks: the machine's description, plain-text tables and the decode timing."""
import os
import platform
import time


def machine() -> str:
    """CPU model and core count, for the record."""
    model = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores available"


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (numbers with two decimals at most)."""
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def greedy_decode_speed(engine, prompt: list[int], tokens: int) -> float:
    """Tokens/s of `tokens` greedy decode steps of an Engine after `prompt` (untimed), in a fresh cache."""
    # Imported here: the other helpers also serve scripts run where the extension is not built, and
    # bench/decode_ab.py times another tree's build, found on its path.
    from llaisys_chat import _native
    cache = engine.model.new_cache(engine.max_context)
    logits = engine.model.forward(cache, prompt)
    start = time.perf_counter()
    for _ in range(tokens):
        logits = engine.model.forward(cache, [_native.argmax(logits[-1])[1]])
    return tokens / (time.perf_counter() - start)
