"""A random-weight model with the demo's shapes, config and tokenizer, for machines that cannot hold
the demo's files (decode speed does not depend on the weights' values).

    python bench/random_model.py SOURCE_FOLDER OUT_FOLDER
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from tiny import save_safetensors  # noqa: E402

from llaisys_chat.model.config import ModelConfig
from llaisys_chat.model.weights import model_weights

SHARD_BYTES = 1 << 30  # safetensors files of at most ~1 GiB
COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def random_bf16(shape, rng) -> np.ndarray:
    """bf16 bits of random values of magnitude 2^-9 .. 2^-4 with random signs (fast: no float math)."""
    n = int(np.prod(shape))
    sign = (rng.integers(0, 2, n, dtype=np.uint16) << 15)
    exponent = (rng.integers(118, 123, n, dtype=np.uint16) << 7)
    mantissa = rng.integers(0, 128, n, dtype=np.uint16)
    return (sign | exponent | mantissa).reshape(shape)


def make_random_model(source: Path, out: Path, seed: int = 0) -> Path:
    """Copy source's config and tokenizer files into out and write random bf16 weights beside them."""
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    config = ModelConfig.from_file(out / "config.json")
    rng = np.random.default_rng(seed)
    shapes = {w.hf_name: w.shape(config) for w in model_weights(config)}
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = np.full(shape, 0x3F80, np.uint16) if name.endswith("norm.weight") else random_bf16(shape, rng)
        size += current[name].nbytes
        if size > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    weight_map = {}
    for i, arrays in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(arrays, out / file)
        weight_map.update({name: file for name in arrays})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


if __name__ == "__main__":
    print(make_random_model(Path(sys.argv[1]), Path(sys.argv[2])))
