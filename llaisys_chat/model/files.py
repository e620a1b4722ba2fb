"""Where models live: resolving `demo`, a `.gguf` file or a Hugging Face folder to a ready folder.

Converted models are cached (cache.py) under $LLAISYS_HOME (default ~/.cache/llaisys-chat).
"""
import hashlib
import os
import sys
from pathlib import Path

from ..errors import LlaisysError
from .cache import cache_home, exclusive, staging_dir
from .demo import demo_gguf
from .gguf_convert import convert_gguf

DTYPES = ("bf16", "f32")


def weight_dtype(compute: str) -> str:
    """The dtype a converted model is stored in for a compute mode ('f32', else 'bf16')."""
    return "f32" if compute == "f32" else "bf16"


def resolve_model(model: str | os.PathLike, dtype: str = "bf16") -> Path:
    """A Hugging Face-style folder for `model`: 'demo', a .gguf file or a folder with config.json.

    GGUF files (and the demo) are converted once, with weights in `dtype` ('bf16' or 'f32').
    """
    if dtype not in DTYPES:
        raise LlaisysError(f"weight dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if str(model) == "demo":
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
            with staging_dir(target) as tmp:
                convert_gguf(gguf, tmp, dtype)
            print(f"llaisys: converted {gguf.name} to {target}", file=sys.stderr)
    return target
