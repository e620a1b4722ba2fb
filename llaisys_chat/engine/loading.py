"""Loading a checkpoint into the native model: the type each weight is packed in, the slice this
rank takes of it, and the order: one tensor at a time, its file pages handed back once it is packed,
so that loading never holds much more than the packed weights."""
import math

from .. import _native
from ..errors import LlaisysError
from ..model.checkpoint import NATIVE_QUANTIZED, StoredTensor
from ..model.config import ModelConfig
from ..model.weights import EMBED_TOKENS, LM_HEAD, Weight, model_weights
from ..protocol.request import WEIGHT_TYPES
from .shard_plan import ShardPlan


def packed_types(checkpoint, config: ModelConfig, weights: str) -> dict[Weight, str]:
    """The type each matrix (and the embedding table) is packed in: under 'auto' its own (f16
    computes in bf16, and GGUF types the engine has no kernels for are dequantized to bf16), else
    the one asked for; under 'q4_0' the output matrix stays in 8 bits (q8_0), as llama.cpp keeps it
    in more than 4: it is what every token's choice is read from. Norms and biases are always f32."""
    if weights not in WEIGHT_TYPES:
        raise LlaisysError(f"weights must be one of {', '.join(WEIGHT_TYPES)}, not {weights!r}")
    output = EMBED_TOKENS if config.tie_word_embeddings else LM_HEAD
    types = {}
    for weight in model_weights(config):
        if weight not in checkpoint:
            continue
        stored = checkpoint.header(weight)
        if len(stored.shape) == 1:
            types[weight] = "f32"
        elif weights == "q4_0" and weight.spec is output:
            types[weight] = "q8_0"
        elif weights != "auto":
            types[weight] = weights
        elif stored.dtype == "f16" or (stored.quantized and stored.dtype not in NATIVE_QUANTIZED):
            types[weight] = "bf16"
        else:
            types[weight] = stored.dtype
    if weights in ("q8_0", "q4_0"):
        for weight, dtype in types.items():
            if dtype in ("q8_0", "q4_0") and checkpoint.header(weight).shape[-1] % 32:
                raise LlaisysError(f"{weight.hf_name} has rows of {checkpoint.header(weight).shape[-1]} values: "
                                   f"{weights} needs whole blocks of 32")
    return types


def cache_type(types: dict[Weight, str]) -> str:
    """The key/value cache's type: f32 for an f32 model (as checked against references), else bf16."""
    return "f32" if types[next(w for w in types if w.spec is EMBED_TOKENS)] == "f32" else "bf16"


def column_units(checkpoint, config: ModelConfig, types: dict[Weight, str]) -> tuple[int, int]:
    """(heads, MLP columns) per unit of the row-parallel splits, so that no block of any type the
    o_proj / down_proj columns are stored or packed in straddles two ranks."""
    blocks = {"head": 1, "ffn": 1}
    for weight, dtype in types.items():
        split = weight.spec.split
        if split.axis == 1:
            stored = checkpoint.header(weight).block
            blocks[split.over] = math.lcm(blocks[split.over], stored, _native.block_elements(_dtype(dtype)))
    head_unit = math.lcm(config.head_dim, blocks["head"]) // config.head_dim
    return head_unit, blocks["ffn"]


def load_weights(model, checkpoint, plan: ShardPlan, config: ModelConfig, types: dict[Weight, str]) -> None:
    """Every weight of this rank's shard into the native model, one tensor at a time."""
    for weight, dtype in types.items():
        stored = checkpoint.rank_slice(weight, plan.bounds(), lambda w, t: plan.slice_of(w, t, config))
        if stored.quantized and (stored.dtype not in NATIVE_QUANTIZED or len(stored.shape) == 1):
            stored = stored.dequantized()
        model.load(getattr(_native.Slot, weight.spec.native.upper()), weight.layer or 0, native_array(stored),
                   _dtype(dtype))
        checkpoint.release(weight)
    model.finish_loading()


def native_array(stored: StoredTensor):
    """What the native model takes: the numpy view, or for GGUF blocks a QuantizedArray."""
    if stored.quantized:
        return _native.QuantizedArray(stored.data, _dtype(stored.dtype))
    return stored.data


def _dtype(name: str) -> "_native.DType":
    return getattr(_native.DType, name.upper())
