"""A model folder's weights, memory-mapped and checked on open: safetensors files (single or sharded
with an index), or the GGUF file the folder links as model.gguf.

Each tensor is a numpy view of the mapped file: values for float types (bf16 as uint16 bits), and
for GGUF's block-quantized types the raw blocks as uint8 [rows, row bytes]. Nothing is read until a
slice is used, so each rank touches only its shard's bytes; once a tensor is loaded, release() hands
its pages back, so that loading never holds the file and the packed weights at once.
"""
import ctypes
import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LlaisysError
from .config import ModelConfig
from .gguf_file import GGUFFile, block_size, type_name
from .weights import Weight, model_weights

GGUF_FILE = "model.gguf"
# safetensors dtype -> (our name, numpy dtype of the bits we hand to the engine)
_SAFETENSORS_DTYPES = {"BF16": ("bf16", np.uint16), "F16": ("f16", np.float16), "F32": ("f32", np.float32)}
_FLOAT_VIEWS = {"bf16": np.uint16, "f16": np.float16, "f32": np.float32}  # GGUF float types, as numpy sees them
# GGUF types the engine computes in natively (others are dequantized to f32 when loaded).
NATIVE_QUANTIZED = ("q8_0", "q4_0", "q5_0", "q4_k", "q6_k")
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_MADV_DONTNEED = 4


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as its file stores it: a dtype name (f32, f16, bf16, q8_0, q4_k, ... as GGUF names
    them, lowercase), its shape in values, and a view of its bytes. Quantized types come in blocks
    of `block` values held in `block_bytes` bytes along each row."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray
    block: int = 1
    block_bytes: int = 0

    @property
    def quantized(self) -> bool:
        """Whether the values come in blocks (GGUF's quantized types)."""
        return self.block > 1

    def rows(self, selected: slice) -> "StoredTensor":
        """A run of rows (or of a vector's elements)."""
        data = self.data[selected]
        return StoredTensor(self.dtype, (data.shape[0], *self.shape[1:]), data, self.block, self.block_bytes)

    def columns(self, selected: slice) -> "StoredTensor":
        """A run of columns of a matrix; for a quantized type it must start and end on block bounds."""
        begin, end, _ = selected.indices(self.shape[1])
        if not self.quantized:
            return StoredTensor(self.dtype, (self.shape[0], end - begin), self.data[:, begin:end])
        if begin % self.block or (end % self.block and end != self.shape[1]):
            raise LlaisysError(f"a split of {self.dtype} columns must fall on its {self.block}-value blocks")
        data = self.data[:, begin // self.block * self.block_bytes:-(-end // self.block) * self.block_bytes]
        return StoredTensor(self.dtype, (self.shape[0], end - begin), data, self.block, self.block_bytes)

    def dequantized(self) -> "StoredTensor":
        """The values as f32 (for GGUF types the engine does not compute in)."""
        from gguf.quants import dequantize

        values = dequantize(np.ascontiguousarray(self.data), _gguf_type(self.dtype)).reshape(self.shape)
        return StoredTensor("f32", self.shape, values.astype(np.float32, copy=False))


class Checkpoint:
    """The tensors of a model folder, by the weight table's names, as read-only mapped arrays."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.is_gguf = (self.folder / GGUF_FILE).exists()
        if self.is_gguf:
            self._tensors = _map_gguf(self.folder / GGUF_FILE)
        else:
            self._tensors = {}
            for file in _weight_files(self.folder):
                self._tensors.update(_map_safetensors(file))

    def values(self) -> int:
        """How many weight values the folder holds."""
        return sum(math.prod(t.shape) for t in self._tensors.values())

    def _name(self, weight: Weight) -> str:
        return weight.gguf_name if self.is_gguf else weight.hf_name

    def __contains__(self, weight: Weight) -> bool:
        return self._name(weight) in self._tensors

    def tensor(self, weight: Weight) -> StoredTensor:
        """The stored tensor of one weight."""
        return self._tensors[self._name(weight)]

    def header(self, weight: Weight) -> StoredTensor:
        """The whole tensor, for its type and shape (as a sliced folder gives them too)."""
        return self.tensor(weight)

    def rank_slice(self, weight: Weight, shard: dict, slicer) -> StoredTensor:
        """This rank's slice of a weight: slicer(weight, tensor) cuts it (a sliced folder has it cut)."""
        return slicer(weight, self.tensor(weight))

    def check_shapes(self, config: ModelConfig) -> None:
        """Raise LlaisysError naming the first tensor that is missing or has the wrong shape."""
        for weight in model_weights(config):
            name, shape = self._name(weight), weight.shape(config)
            if name not in self._tensors:
                if weight.spec.optional:
                    continue
                raise LlaisysError(f"{self.folder}: checkpoint has no tensor {name}")
            if self._tensors[name].shape != shape:
                raise LlaisysError(f"{self.folder}: {name} has shape {list(self._tensors[name].shape)}, "
                                   f"expected {list(shape)}")

    def release(self, weight: Weight) -> None:
        """Drop a loaded tensor's pages from this process (a later read would map them again)."""
        data = self.tensor(weight).data
        page = mmap.PAGESIZE
        start, end = data.ctypes.data, data.ctypes.data + data.nbytes
        first, last = -(-start // page) * page, end // page * page
        if last > first:
            _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


_libc = ctypes.CDLL(None, use_errno=True)


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


def _map_safetensors(file: Path) -> dict[str, StoredTensor]:
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
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise LlaisysError(f"{file}: corrupt header entry for {name}") from None
        if dtype not in _SAFETENSORS_DTYPES:
            raise LlaisysError(f"{file}: {name} has dtype {dtype}; supported: BF16, F16, F32")
        ours, np_dtype = _SAFETENSORS_DTYPES[dtype]
        n_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
        if not (0 <= begin <= end and end - begin == n_bytes and data_start + end <= size):
            raise LlaisysError(f"{file}: {name} lies outside the file or disagrees with its shape (truncated or corrupt)")
        tensors[name] = StoredTensor(ours, shape, mapped[data_start + begin:data_start + end].view(np_dtype).reshape(shape))
    return tensors


def _map_gguf(file: Path) -> dict[str, StoredTensor]:
    """The tensors of a GGUF file, mapped in place: values for float types, blocks for the others."""
    gguf = GGUFFile(file)
    tensors = {}
    for name, info in gguf.tensors.items():
        dtype, data = type_name(info.type_id), gguf.data(info)
        block, block_bytes = block_size(info.type_id)
        if dtype in _FLOAT_VIEWS:
            tensors[name] = StoredTensor(dtype, info.shape, data.view(_FLOAT_VIEWS[dtype]).reshape(info.shape))
        else:
            tensors[name] = StoredTensor(dtype, info.shape, data.reshape(-1, info.shape[-1] // block * block_bytes),
                                         block, block_bytes)
    return tensors


def _gguf_type(dtype: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[dtype.upper()]
