"""How a machine's cores are split: the layout a started cluster chooses, and the threads each rank
then runs, found from the cores mpiexec bound it to (real mpiexec)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llaisys_chat.client.launch import layout
from llaisys_chat.model.files import running_size

THREADS_OF_EACH_RANK = """
import json, sys
from llaisys_chat.engine.collectives import default_group
from llaisys_chat.engine.engine import default_threads
group = default_group()
found = group.allgather(default_threads(group))
if group.rank == 0:
    print(json.dumps(found))
"""


@pytest.mark.parametrize("cores, asked, expected", [
    (1, None, (1, 1)), (2, None, (1, 2)), (3, None, (1, 3)), (4, None, (2, 2)), (16, None, (2, 8)), (24, None, (3, 8)),
    (64, None, (8, 8)), (16, 4, (4, 4)), (16, 16, (16, 1)), (2, 4, (4, 1)),
])
def test_the_cores_are_split_among_the_engines(cores, asked, expected):
    assert layout(cores, asked) == expected


@pytest.mark.parametrize("cores, asked, model_bytes, expected", [
    (16, None, 463 * 2**20, (4, 4)), (16, None, 1066 * 2**20, (2, 8)), (16, None, None, (2, 8)),
    (2, None, 463 * 2**20, (1, 2)), (8, None, 463 * 2**20, (2, 4)), (32, None, 463 * 2**20, (8, 4)),
    (16, 2, 463 * 2**20, (2, 8)),
])
def test_a_small_model_gets_engines_of_four_threads(cores, asked, model_bytes, expected):
    assert layout(cores, asked, model_bytes) == expected


def test_the_size_a_model_runs_in_is_known_before_it_is_fetched():
    from llaisys_chat.model.builtins import find_builtin
    demo = find_builtin("qwen2.5-coder:0.5b")
    assert running_size("qwen2.5-coder:0.5b") == demo.size
    assert running_size("demo", "q4_0") == round(demo.values * 18 / 32)  # 354 MB: engines of 4 threads
    assert running_size("demo", "bf16") == demo.values * 2               # 1.26 GB: of 8
    assert running_size("demo", "q5_k") is None


def test_the_size_of_a_file_comes_from_its_headers(tmp_path):
    from safetensors.numpy import save_file

    from llaisys_chat.model.builtins import builtin_gguf, find_builtin
    demo = find_builtin("qwen2.5-coder:0.5b")
    assert running_size(builtin_gguf(demo), "q8_0") == round(demo.values * 34 / 32)
    assert running_size(builtin_gguf(demo)) == demo.size
    save_file({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}, str(tmp_path / "model.safetensors"))
    assert running_size(tmp_path) == 17 * 2  # safetensors run in bf16 under auto
    assert running_size(tmp_path, "f32") == 17 * 4
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(100))
    assert running_size(broken) == 104
    assert running_size(broken, "q4_0") is None  # unreadable: the load will say why
    assert running_size(tmp_path / "missing.gguf") is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
@pytest.mark.parametrize("placement, expected", [
    (["-n", "1", "--map-by", "slot:PE=2", "--bind-to", "core"], [2]),  # one rank bound to both cores
    (["-n", "2", "--bind-to", "core"], [1, 1]),                         # a core each
    (["-n", "2", "--bind-to", "none"], [1, 1]),                         # both cores, shared by two
    (["-n", "1", "--bind-to", "none"], [2]),
])
def test_each_rank_runs_as_many_threads_as_it_has_cores_of_its_own(placement, expected):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    done = subprocess.run([str(mpiexec), *placement, sys.executable, "-c", THREADS_OF_EACH_RANK], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
