"""One rank's slices of a model, kept on a host that does not hold the model's files.

A sliced folder looks like a model folder to everything above the weights (config.json and the
tokenizer files are there), and holds, instead of the weights, `slices.json` and one `.npy` per
tensor: the bytes of this rank's slice in the file's own type. `slices.json` records, for every
tensor, its full dtype, shape and blocks (what the shard plan is computed from), and the model's
fingerprint and the shard it was cut for, so that a folder is reused only for the same model and
the same slice.
"""
import json
from pathlib import Path

import numpy as np

from ..errors import LlaisysError
from .checkpoint import Checkpoint, StoredTensor
from .config import ModelConfig
from .weights import Weight, model_weights

INDEX = "slices.json"


def open_checkpoint(folder: Path):
    """The weights of a model folder: a Checkpoint, or a SlicedCheckpoint for a sliced folder."""
    return SlicedCheckpoint(folder) if (Path(folder) / INDEX).exists() else Checkpoint(folder)


class SlicedCheckpoint:
    """The tensors of a sliced folder: headers (full shapes) for planning, slices for loading."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            index = json.loads((self.folder / INDEX).read_text())
            self.fingerprint, self.shard, self.is_gguf = index["fingerprint"], index["shard"], index["gguf"]
            self._entries = index["tensors"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise LlaisysError(f"{self.folder}: corrupt slice folder ({e})") from None

    def _name(self, weight: Weight) -> str:
        return weight.gguf_name if self.is_gguf else weight.hf_name

    def __contains__(self, weight: Weight) -> bool:
        return self._name(weight) in self._entries

    def header(self, weight: Weight) -> StoredTensor:
        """The whole tensor's type and shape (its data is not here)."""
        e = self._entries[self._name(weight)]
        return StoredTensor(e["dtype"], tuple(e["shape"]), np.zeros(0, np.uint8), e["block"], e["block_bytes"])

    def rank_slice(self, weight: Weight, shard: dict, slicer) -> StoredTensor:
        """This rank's slice, as stored; `shard` must be the one the folder was cut for."""
        if shard != self.shard:
            raise LlaisysError(f"{self.folder}: slices cut for another shard")
        e = self._entries[self._name(weight)]
        data = np.load(self.folder / e["file"], mmap_mode="r")
        return StoredTensor(e["dtype"], tuple(e["slice_shape"]), data, e["block"], e["block_bytes"])

    def check_shapes(self, config: ModelConfig) -> None:
        for weight in model_weights(config):
            if weight not in self:
                if weight.spec.optional:
                    continue
                raise LlaisysError(f"{self.folder}: no slice of {self._name(weight)}")
            if self.header(weight).shape != weight.shape(config):
                raise LlaisysError(f"{self.folder}: {self._name(weight)} has the wrong shape")

    def release(self, weight: Weight) -> None:
        """Nothing to hand back: each slice is mapped only while it loads."""


def write_index(folder: Path, fingerprint: str, shard: dict, gguf: bool, tensors: dict) -> None:
    """The folder's index, written last: a folder without it was never completed."""
    (Path(folder) / INDEX).write_text(json.dumps({"fingerprint": fingerprint, "shard": shard, "gguf": gguf,
                                                  "tensors": tensors}))
