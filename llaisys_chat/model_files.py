"""Where models live: resolving `demo`, a `.gguf` file or a Hugging Face folder to a ready folder.

Converted models are cached under $LLAISYS_HOME (default ~/.cache/llaisys-chat). Several processes
(MPI ranks) may resolve the same model at once: a file lock lets one do the work while the others
wait, and results appear by atomic rename, so nobody sees a half-written folder.
"""
import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import LlaisysError

DTYPES = ("bf16", "f32")


def cache_home() -> Path:
    """The folder holding downloads and converted models ($LLAISYS_HOME or ~/.cache/llaisys-chat)."""
    return Path(os.environ.get("LLAISYS_HOME") or Path.home() / ".cache" / "llaisys-chat")


def resolve_model(model: str | os.PathLike, dtype: str = "bf16") -> Path:
    """A Hugging Face-style folder for `model`: 'demo', a .gguf file or a folder with config.json.

    GGUF files (and the demo) are converted once, with weights in `dtype` ('bf16' or 'f32').
    """
    if dtype not in DTYPES:
        raise LlaisysError(f"weight dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if str(model) == "demo":
        from .demo import demo_gguf
        return converted_folder(demo_gguf(), dtype, name="qwen2.5-coder-0.5b-instruct")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LlaisysError(f"{path}: not a model folder (no config.json)")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LlaisysError(f"{path}: file not found")
        return converted_folder(path, dtype)
    if not path.exists():
        raise LlaisysError(f"{path}: no such model (give 'demo', a .gguf file or a model folder)")
    raise LlaisysError(f"{path}: not a model (give 'demo', a .gguf file or a model folder)")


def converted_folder(gguf: Path, dtype: str, name: str | None = None) -> Path:
    """The cached Hugging Face folder converted from `gguf`, converting it first if needed."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_home() / "models" / f"{name or gguf.stem}-{key}-{dtype}"
    if (target / "config.json").exists():
        return target
    with exclusive(target):
        if not (target / "config.json").exists():
            from .gguf_convert import convert_gguf
            with staging_dir(target) as tmp:
                convert_gguf(gguf, tmp, dtype)
            print(f"llaisys: converted {gguf.name} to {target}", file=sys.stderr)
    return target


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
