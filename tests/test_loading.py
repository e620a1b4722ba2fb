"""Loading in place (engine/loading.py): peak memory while loading stays near what the model keeps,
on one rank and on two, and a model of 70% of a real memory limit loads and generates under it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mpiexec
from tiny import write_tiny_gguf

SCRIPT = Path(__file__).parent / "load_memory.py"
MB = 1 << 20


def loaded(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_peak_near_steady(report):
    for rank in report["ranks"]:
        assert rank["peak_rss"] <= 1.15 * rank["steady_rss"] + 100 * MB, rank
    assert len(report["tokens"]) == 8


@pytest.mark.parametrize("weights", ["auto", "bf16"])
@pytest.mark.parametrize("n", [1, 2])
def test_peak_memory_while_loading_the_demo(demo_folder, weights, n):
    report = loaded(mpiexec(n, sys.executable, SCRIPT, demo_folder, weights, timeout=600))
    assert_peak_near_steady(report)
    total = sum(r["weight_bytes"] for r in report["ranks"])
    assert total < (600 if weights == "auto" else 1300) * MB  # the demo's own types take about 0.5 GB


def memory_cgroup(limit: int):
    """A fresh child of this process's memory cgroup (v2, else v1) limited to `limit` bytes: its
    cgroup.procs file, and its folder to remove afterwards; None where none can be made here."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, limit_files = Path("/sys/fs/cgroup") / path.lstrip("/"), ["memory.max"]
        elif "memory" in controllers.split(","):
            base, limit_files = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), ["memory.limit_in_bytes",
                                                                                   "memory.memsw.limit_in_bytes"]
        else:
            continue
        group = base / f"llaisys-test-{os.getpid()}"
        try:
            group.mkdir()
            for name in limit_files:
                if (group / name).exists():
                    (group / name).write_text(str(limit))
            return group
        except OSError:
            if group.exists():
                group.rmdir()
    return None


def test_a_model_of_70_percent_of_a_memory_limit_loads_and_generates(tmp_path):
    # Random Q8_0 weights of a larger Qwen2 shape (hidden 1536, MLP 8960): about 800 MB packed.
    model = write_tiny_gguf(tmp_path / "big.gguf", layers=16, hidden=1536, heads=12, kv_heads=2, ffn=8960,
                            types=dict.fromkeys(["token_embd", "output", "attn_q", "attn_k", "attn_v",
                                                 "attn_output", "ffn_gate", "ffn_up", "ffn_down"], "Q8_0"))
    packed = 16 * (2 * 1536 * 1536 + 2 * 256 * 1536 + 3 * 8960 * 1536) * 34 // 32
    limit = int(packed / 0.7)
    group = memory_cgroup(limit)
    if group is None:
        pytest.skip("this machine lets no process make a memory cgroup")
    try:
        result = subprocess.run([sys.executable, SCRIPT, model], capture_output=True, text=True, timeout=600,
                                preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        report = loaded(result)
        assert report["ranks"][0]["weight_bytes"] > 0.95 * packed
        assert_peak_near_steady(report)
        peak_file = next(group / name for name in ("memory.peak", "memory.max_usage_in_bytes") if (group / name).exists())
        assert packed < int(peak_file.read_text()) <= limit  # it ran inside the limit, and held the model there
    finally:
        group.rmdir()
