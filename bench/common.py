"""Helpers shared by the benchmarks: the machine's description and plain-text tables."""
import os
import platform


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
