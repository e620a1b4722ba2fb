"""Where models live: resolving a built-in name, a `.gguf` file or a Hugging Face folder to a ready
model folder. A GGUF becomes a small cached folder (gguf_metadata.py) under $LLAISYS_HOME (default
~/.cache/llaisys-chat) that links the file itself: its tensors are read in place."""
import hashlib
import os
import sys
from pathlib import Path

from ..errors import LlaisysError
from .builtins import BUILTINS, builtin_gguf, find_builtin
from .cache import cache_home, exclusive, staging_dir
from .checkpoint import GGUF_FILE
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


def running_size(model: str | os.PathLike, weights: str = "auto") -> int | None:
    """Bytes of weights `model` runs in, where its files tell without reading them: a built-in (known
    before it is downloaded) or a .gguf file in its own types, a folder's safetensors in bf16. None
    for another weight type, or a model that is not here (say, on the engines' hosts only)."""
    builtin = find_builtin(str(model))
    if builtin is not None:
        return builtin.size if weights == "auto" else None
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path.stat().st_size if weights == "auto" else None
    if path.is_dir() and weights in ("auto", "bf16"):
        return sum(f.stat().st_size for f in path.glob("*.safetensors")) or None
    return None


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
