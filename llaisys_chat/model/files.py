"""Where models live: resolving a built-in name, a `.gguf` file or a Hugging Face folder to a ready
model folder. A GGUF becomes a small cached folder (gguf_metadata.py) under $LLAISYS_HOME (default
~/.cache/llaisys-chat) that links the file itself: its tensors are read in place."""
import hashlib
import math
import os
import sys
from pathlib import Path

from ..errors import LlaisysError
from .builtins import BUILTINS, builtin_gguf, find_builtin
from .cache import cache_home, exclusive, staging_dir
from .checkpoint import GGUF_FILE, Checkpoint
from .gguf_file import GGUFFile
from .gguf_metadata import write_gguf_folder


def resolve_model(model: str | os.PathLike) -> Path:
    """A model folder for `model`: a built-in name (see `llaisys-chat models`), a .gguf file or a
    folder with config.json."""
    builtin = find_builtin(str(model))
    if builtin is not None:
        return gguf_folder(builtin_gguf(builtin), name=builtin.file_name.removesuffix(".gguf"))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LlaisysError(f"{path}: not a model folder (no config.json)")
        return path
    names = ", ".join(m.name for m in BUILTINS)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LlaisysError(f"{path}: file not found")
        return gguf_folder(path)
    if not path.exists():
        raise LlaisysError(f"{path}: no such model (give a built-in name: {names}; a .gguf file or a model folder)")
    raise LlaisysError(f"{path}: not a model (give a built-in name: {names}; a .gguf file or a model folder)")


# Bytes a weight value takes in each type the engine converts to (quantized: block scales included).
_VALUE_BYTES = {"bf16": 2, "f32": 4, "q8_0": 34 / 32, "q4_0": 18 / 32}


def running_size(model: str | os.PathLike, weights: str = "auto") -> int | None:
    """Bytes of weights `model` runs in, told by its files' headers without reading the weights: a GGUF
    in its own types is its file's size; in another type (or safetensors, bf16 under auto) its values
    times that type's bytes a value. A built-in is known before it is fetched. None where it cannot be
    told here: a model on the engines' hosts only, or an unreadable one (loading it says why)."""
    per_value = _VALUE_BYTES.get("bf16" if weights == "auto" else weights)
    builtin = find_builtin(str(model))
    if builtin is not None:
        if weights == "auto":
            return builtin.size
        return None if per_value is None else round(builtin.values * per_value)
    path = Path(model).expanduser()
    try:
        if path.suffix == ".gguf" and path.is_file():
            if weights == "auto":
                return path.stat().st_size
            values = sum(math.prod(t.shape) for t in GGUFFile(path).tensors.values())
        elif path.is_dir():
            checkpoint = Checkpoint(path)
            if checkpoint.is_gguf and weights == "auto":
                return (path / GGUF_FILE).stat().st_size
            values = checkpoint.values()
        else:
            return None
    except (LlaisysError, OSError):
        return None
    return None if per_value is None else round(values * per_value)


def gguf_folder(gguf: Path, name: str | None = None) -> Path:
    """The cached folder for `gguf`, written first if needed."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_home() / "models" / f"{name or gguf.stem}-{key}-gguf"
    if (target / GGUF_FILE).exists():
        return target
    with exclusive(target):
        if not (target / GGUF_FILE).exists():
            with staging_dir(target) as tmp:
                write_gguf_folder(gguf, tmp)
            print(f"llaisys: prepared {gguf.name} in {target}", file=sys.stderr)
    return target
