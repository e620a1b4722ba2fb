"""Reading a GGUF file (llama.cpp's format, version 2 or 3): its key/value metadata and its tensors,
mapped in place.

Every count, length and offset is checked against the file before anything is allocated or mapped,
so a damaged or hostile file gives one LlaisysError. (The gguf package's reader takes about ten
seconds over a vocabulary of 150,000 tokens; this one reads string arrays in one pass.)
"""
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LlaisysError

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies in the file: its ggml type id, shape (outermost first) and byte range."""

    name: str
    type_id: int
    shape: tuple[int, ...]
    offset: int
    n_bytes: int


class GGUFFile:
    """A GGUF file's metadata (a dict) and tensor infos, with the file mapped read-only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise LlaisysError(f"{self.path}: cannot read the file ({e})") from None
        self._buffer = memoryview(self._map)
        self._at = 0
        if bytes(self._take(4)) != MAGIC:
            raise self._error("not a GGUF file (bad magic)")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise self._error(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        if n_tensors > self._left() // 24 or n_kv > self._left() // 12:
            raise self._error(f"corrupt counts ({n_tensors} tensors, {n_kv} metadata entries)")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("<I"))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self._error(f"corrupt alignment {alignment!r}")
        data_start = -(-self._at // alignment) * alignment
        self.tensors = {}
        for name, type_id, shape, offset in infos:
            try:
                block, size = block_size(type_id)
            except ValueError:
                raise self._error(f"tensor {name} has unknown type {type_id}") from None
            if shape[-1] % block:
                raise self._error(f"tensor {name}'s rows are not whole blocks of {block}")
            n_bytes = int(np.prod(shape, dtype=object)) // block * size
            if offset % alignment or data_start + offset + n_bytes > len(self._map):
                raise self._error(f"tensor {name} lies outside the file (truncated or corrupt)")
            if name in self.tensors:
                raise self._error(f"tensor {name} appears twice")
            self.tensors[name] = TensorInfo(name, type_id, shape, data_start + offset, n_bytes)

    def data(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes, mapped (uint8)."""
        return self._map[info.offset:info.offset + info.n_bytes]

    # -- parsing ---------------------------------------------------------------------------------

    def _error(self, what: str) -> LlaisysError:
        return LlaisysError(f"{self.path}: not a readable GGUF file ({what})")

    def _left(self) -> int:
        return len(self._buffer) - self._at

    def _take(self, n: int) -> memoryview:
        if n < 0 or n > self._left():
            raise self._error(f"truncated at byte {self._at}")
        view = self._buffer[self._at:self._at + n]
        self._at += n
        return view

    def _scalar(self, fmt: str):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        try:
            return str(self._take(self._scalar("<Q")), "utf-8")
        except UnicodeDecodeError:
            raise self._error(f"a string before byte {self._at} is not UTF-8") from None

    def _value(self, type_id: int):
        if type_id in _SCALARS:
            return self._scalar(_SCALARS[type_id])
        if type_id == _STRING:
            return self._string()
        if type_id != _ARRAY:
            raise self._error(f"unknown metadata type {type_id}")
        item_type, count = self._scalar("<I"), self._scalar("<Q")
        if item_type in _SCALARS:
            size = struct.calcsize(_SCALARS[item_type])
            if count > self._left() // size:
                raise self._error(f"an array of {count} items is longer than the file")
            return np.frombuffer(self._take(count * size), dtype=np.dtype(_SCALARS[item_type])).tolist()
        if item_type == _STRING:
            if count > self._left() // 8:
                raise self._error(f"an array of {count} strings is longer than the file")
            return [self._string() for _ in range(count)]
        raise self._error(f"arrays of type {item_type} are not supported")

    def _tensor_info(self):
        name = self._string()
        n_dims = self._scalar("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise self._error(f"tensor {name} has {n_dims} dimensions")
        dims = [self._scalar("<Q") for _ in range(n_dims)]
        if any(d <= 0 or d > 1 << 40 for d in dims):
            raise self._error(f"tensor {name} has dimensions {dims}")
        type_id, offset = self._scalar("<I"), self._scalar("<Q")
        return name, type_id, tuple(reversed(dims)), offset  # GGUF lists the innermost dimension first


def type_name(type_id: int) -> str:
    """ggml's name of a tensor type, lowercase (f32, q4_k, ...)."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(type_id).name.lower()


def block_size(type_id: int) -> tuple[int, int]:
    """(values, bytes) per block of a ggml type (1 and the element size for plain types)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
