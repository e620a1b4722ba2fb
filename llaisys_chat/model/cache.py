"""The cache folder ($LLAISYS_HOME, default ~/.cache/llaisys-chat) and safe ways to fill it.

Several processes (MPI ranks) may prepare the same file at once: a lock lets one do the work while
the others wait, and results appear by atomic rename, so nobody sees a half-written folder.
"""
import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path


def cache_home() -> Path:
    """The folder holding downloads and converted models ($LLAISYS_HOME or ~/.cache/llaisys-chat)."""
    return Path(os.environ.get("LLAISYS_HOME") or Path.home() / ".cache" / "llaisys-chat")


@contextlib.contextmanager
def exclusive(target: Path):
    """Hold a lock named after `target` so that one process at a time prepares it."""
    locks = cache_home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def staging_dir(target: Path):
    """A temporary folder beside `target` that becomes `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():  # a leftover without config.json: never completed
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
