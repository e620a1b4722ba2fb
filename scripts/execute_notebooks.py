"""Runs the notebooks top to bottom on a real 2-engine MPI cluster and saves them with their outputs,
so that a reader on a code host sees the replies and the scaling plot.

    .venv/bin/python scripts/execute_notebooks.py
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import ipcluster  # noqa: E402  (the same real cluster the tests start)

KERNELS = {"quickstart.ipynb": "python3", "tensor_parallel.ipynb": "python3", "chat_kernel.ipynb": "llaisys-chat"}


def main() -> None:
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    with tempfile.TemporaryDirectory() as scratch:
        prefix = Path(scratch) / "jupyter"
        subprocess.run([Path(sys.executable).parent / "llaisys-chat", "kernel", "install", "--prefix", prefix], check=True)
        os.environ["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
        with ipcluster(Path(scratch) / "ipython", n=2):
            for name, kernel in KERNELS.items():
                path = ROOT / "notebooks" / name
                notebook = nbformat.read(path, as_version=4)
                NotebookClient(notebook, timeout=900, kernel_name=kernel,
                               resources={"metadata": {"path": scratch}}).execute()
                nbformat.write(notebook, path)
                print(f"executed {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
