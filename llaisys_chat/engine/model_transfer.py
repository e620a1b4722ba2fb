"""Hosts without the model's files: before loading, the ranks compare what they hold, and a rank that
holds the model sends every rank that lacks it (or holds another version of it) the small files and
only that rank's own slice of every weight, over MPI. The receiver keeps its slices in its cache
(model/sliced.py) and loads from them, then and at later loads, while the model is the same.

What a rank holds is named by a fingerprint: the sha256 of its files, remembered per file size and
time in the cache so that a model is hashed once. Steps, all ranks together:
1. everyone's fingerprint (None without the files); if all asked for the same model, the lowest
   rank with one is the source, and ranks whose fingerprint differs receive;
2. the source sends each receiver the manifest: the small files and every tensor's type and shape;
3. each receiver works out its shard from it, and answers whether its cache already holds the slices;
4. the source sends the slices that are missing, tensor by tensor, each rank only its own.
A failure on either side is reported through the same messages, so that nobody waits forever.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from ..errors import LlaisysError
from ..model.builtins import find_builtin
from ..model.cache import cache_home, staging_dir
from ..model.checkpoint import Checkpoint, StoredTensor
from ..model.config import ModelConfig
from ..model.files import resolve_model
from ..model.sliced import SlicedCheckpoint, write_index
from ..model.weights import model_weights
from .loading import column_units, packed_types
from .shard_plan import ShardPlan

SMALL_FILE_BYTES = 64 << 20  # the folder's files other than the weights (config, tokenizer) travel whole
_WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def local_model(model) -> Path | None:
    """This host's folder of `model`, without downloading anything; None if it does not hold it."""
    builtin = find_builtin(str(model))
    if builtin is not None and not builtin.downloaded:
        return None
    try:
        return resolve_model(model)
    except LlaisysError:
        return None


def fingerprint(folder: Path) -> str:
    """sha256 over the folder's files (a GGUF through its link), remembered by path, size and time."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    key = hashlib.sha256("\n".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files).encode())
    memo = cache_home() / "fingerprints" / key.hexdigest()
    if memo.exists():
        return memo.read_text()
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest.hexdigest())
    except OSError:  # a read-only cache: hashed again next time
        pass
    return digest.hexdigest()


def share_model(group, model, weights: str) -> Path:
    """Collective: the model folder this rank loads from: its own copy, or the slices a rank that
    has the model sent it. With no rank holding the model, every rank resolves it (downloads a
    built-in) as usual."""
    if group.size == 1:
        return resolve_model(model)
    try:  # whatever goes wrong here, this rank must still take part in the allgather below
        folder = local_model(model)
        held = fingerprint(folder) if folder is not None else None
    except Exception:
        folder = held = None
    asked, everyone = zip(*group.allgather((str(model), held)))
    source = next((r for r, fp in enumerate(everyone) if fp is not None), None)
    if source is None or len(set(asked)) > 1:  # nothing to share, or not one model: each finds its own
        return resolve_model(model)
    reference = everyone[source]
    receivers = [r for r, fp in enumerate(everyone) if fp != reference]
    if not receivers:
        return folder
    if group.rank == source:
        _send(group, folder, reference, receivers, weights)
        return folder
    if group.rank in receivers:
        return _receive(group, source, reference, weights)
    return folder


def _send(group, folder: Path, reference: str, receivers: list[int], weights: str) -> None:
    try:
        checkpoint = Checkpoint(folder)
        config = ModelConfig.from_file(folder / "config.json")
        small = {p.name: p.read_bytes() for p in folder.iterdir()
                 if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES and p.stat().st_size <= SMALL_FILE_BYTES}
        headers = {(w.gguf_name if checkpoint.is_gguf else w.hf_name): _header(checkpoint.tensor(w))
                   for w in model_weights(config) if w in checkpoint}
        manifest = {"fingerprint": reference, "files": small, "gguf": checkpoint.is_gguf, "tensors": headers}
    except Exception as e:  # the receivers wait for the manifest: tell them, then fail
        for r in receivers:
            group.send({"error": f"rank {group.rank} could not read the model: {e}"}, r)
        raise
    for r in receivers:
        group.send(manifest, r)
    wanting = [r for r in receivers if group.recv(r) == "send"]
    if not wanting:
        return
    types = packed_types(checkpoint, config, weights)
    units = column_units(checkpoint, config, types)
    plans = {r: ShardPlan.for_rank(config, r, group.size, *units) for r in wanting}
    for weight in types:
        for r in wanting:
            try:
                cut = plans[r].slice_of(weight, checkpoint.tensor(weight), config)
                piece = np.ascontiguousarray(cut.data)
            except Exception as e:  # the receivers wait for this tensor: tell them, then fail
                for other in wanting:
                    group.send({"error": f"rank {group.rank} could not read {weight.hf_name}: {e}"}, other)
                raise
            group.send({"shape": piece.shape, "dtype": piece.dtype.str, "values": list(cut.shape)}, r)
            group.send_array(piece, r)
        checkpoint.release(weight)


def _receive(group, source: int, reference: str, weights: str) -> Path:
    manifest = group.recv(source)
    if "error" in manifest:
        raise LlaisysError(manifest["error"])
    target = None
    try:
        sliced = _Manifest(manifest)
        config = ModelConfig.from_dict(json.loads(manifest["files"]["config.json"]), source="the source's config.json")
        types = packed_types(sliced, config, weights)
        plan = ShardPlan.for_rank(config, group.rank, group.size, *column_units(sliced, config, types))
        shard_key = hashlib.sha256(json.dumps(plan.bounds(), sort_keys=True).encode()).hexdigest()[:12]
        target = cache_home() / "slices" / f"{reference[:16]}-{shard_key}"
        if (target / "slices.json").exists() and SlicedCheckpoint(target).fingerprint == reference:
            group.send("have", source)
            return target
    except BaseException:
        group.send("have", source)  # nothing will be received: the source must not wait to send it
        raise
    group.send("send", source)
    print(f"llaisys: rank {group.rank} receives its slice of the model from rank {source}", file=sys.stderr)
    with staging_dir(target) as tmp:
        for name, data in manifest["files"].items():
            (tmp / name).write_bytes(data)
        entries, failure = {}, None
        for i, weight in enumerate(types):
            header = group.recv(source)
            if "error" in header:
                raise LlaisysError(header["error"])
            piece = group.recv_array(np.empty(header["shape"], np.dtype(header["dtype"])), source)
            name = weight.gguf_name if manifest["gguf"] else weight.hf_name
            try:
                np.save(tmp / f"{i}.npy", piece)
            except OSError as e:  # keep receiving: the source blocks until each slice is taken
                failure = failure or e
            entries[name] = {**manifest["tensors"][name], "slice_shape": header["values"], "file": f"{i}.npy"}
        if failure is not None:
            raise LlaisysError(f"cannot keep the model's slices in {target}: {failure}")
        write_index(tmp, reference, plan.bounds(), manifest["gguf"], entries)
    return target


def _header(stored) -> dict:
    return {"dtype": stored.dtype, "shape": list(stored.shape), "block": stored.block, "block_bytes": stored.block_bytes}


class _Manifest:
    """The source's tensor headers, as the loading code reads a checkpoint's (type and shape only)."""

    def __init__(self, manifest: dict):
        self._tensors, self.is_gguf = manifest["tensors"], manifest["gguf"]

    def _name(self, weight) -> str:
        return weight.gguf_name if self.is_gguf else weight.hf_name

    def __contains__(self, weight) -> bool:
        return self._name(weight) in self._tensors

    def header(self, weight) -> StoredTensor:
        """A tensor's type and shape (the data stays with the source)."""
        h = self._tensors[self._name(weight)]
        return StoredTensor(h["dtype"], tuple(h["shape"]), np.zeros(0, np.uint8), h["block"], h["block_bytes"])
