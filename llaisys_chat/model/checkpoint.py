"""Memory-mapped safetensors checkpoints (single file or sharded with an index), checked on open.

safetensors' own numpy loader has no bfloat16, so the header is parsed here and each tensor is a
numpy view of the mapped file (bf16 as uint16 bits). Nothing is read until a slice is used, which
lets each rank touch only its shard's bytes.
"""
import json
import struct
from pathlib import Path

import numpy as np

from ..errors import LlaisysError
from .config import ModelConfig
from .weights import model_weights

# safetensors dtype -> numpy dtype of the bits we hand to the engine
_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class Checkpoint:
    """The tensors of a model folder, by Hugging Face name, as read-only memory-mapped arrays."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._tensors: dict[str, np.ndarray] = {}
        for file in _weight_files(self.folder):
            self._tensors.update(_map_safetensors(file))

    def names(self) -> list[str]:
        """All tensor names."""
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def dtype_name(self, name: str) -> str:
        """'bf16', 'f16' or 'f32'."""
        return {np.dtype(np.uint16): "bf16", np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}[self[name].dtype]

    def check_shapes(self, config: ModelConfig) -> None:
        """Raise LlaisysError naming the first tensor that is missing or has the wrong shape."""
        for weight in model_weights(config):
            name, shape = weight.hf_name, weight.shape(config)
            if name not in self:
                if weight.spec.optional:
                    continue
                raise LlaisysError(f"{self.folder}: checkpoint has no tensor {name}")
            if tuple(self[name].shape) != shape:
                raise LlaisysError(f"{self.folder}: {name} has shape {list(self[name].shape)}, expected {list(shape)}")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LlaisysError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = [folder / "model.safetensors"]
    for file in files:
        if not file.exists():
            raise LlaisysError(f"{file}: file not found")
    return files


def _map_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Parse one file's header and map its tensors, checking every offset against the file size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LlaisysError(f"{file}: truncated safetensors file (no header)")
        header_len = struct.unpack("<Q", head)[0]
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise LlaisysError(f"{file}: corrupt safetensors header (length {header_len} for a {size}-byte file)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LlaisysError(f"{file}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise LlaisysError(f"{file}: corrupt safetensors header")
    data_start = 8 + header_len
    mapped = np.memmap(file, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise LlaisysError(f"{file}: corrupt header entry for {name}") from None
        if dtype not in _DTYPES:
            raise LlaisysError(f"{file}: {name} has dtype {dtype}; supported: BF16, F16, F32")
        np_dtype = np.dtype(_DTYPES[dtype])
        n_bytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        if not (0 <= begin <= end and end - begin == n_bytes and data_start + end <= size):
            raise LlaisysError(f"{file}: {name} lies outside the file or disagrees with its shape (truncated or corrupt)")
        tensors[name] = mapped[data_start + begin:data_start + end].view(np_dtype).reshape(shape)
    return tensors
