"""What a Qwen2 checkpoint holds, in one table: every tensor's Hugging Face and GGUF names, its shape
as a function of the config, the native model's field for it, and how tensor parallelism splits it.

Checkpoint checking, the shard plan, GGUF conversion, the native model's weights and the tests all
read this table; nothing else spells out a tensor name.
"""
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

from .config import ModelConfig


@dataclass(frozen=True)
class Split:
    """How ranks divide a tensor (Megatron layout): along `axis` (0: output rows, column-parallel;
    1: input columns, row-parallel) by the rank's range of `over` (head, kv_head, ffn or vocab).
    REPLICATED tensors are held whole by every rank."""

    axis: int | None
    over: str | None


REPLICATED = Split(None, None)
ROWS_BY_HEAD, ROWS_BY_KV_HEAD = Split(0, "head"), Split(0, "kv_head")
ROWS_BY_FFN, ROWS_BY_VOCAB = Split(0, "ffn"), Split(0, "vocab")
COLUMNS_BY_HEAD, COLUMNS_BY_FFN = Split(1, "head"), Split(1, "ffn")


@dataclass(frozen=True)
class WeightSpec:
    """One kind of tensor. In names, {i} stands for the layer index."""

    hf: str
    gguf: str
    native: str  # field of the native Qwen2Weights (global) or Qwen2LayerWeights (per layer)
    shape: Callable[[ModelConfig], tuple[int, ...]]
    split: Split
    optional: bool = False  # q/k/v biases


def _d(c):
    return (c.hidden_size,)


def _q_out(c):
    return c.num_attention_heads * c.head_dim


def _kv_out(c):
    return c.num_key_value_heads * c.head_dim


EMBED_TOKENS = WeightSpec("model.embed_tokens.weight", "token_embd.weight", "embed_tokens",
                          lambda c: (c.vocab_size, c.hidden_size), ROWS_BY_VOCAB)
FINAL_NORM = WeightSpec("model.norm.weight", "output_norm.weight", "final_norm", _d, REPLICATED)
LM_HEAD = WeightSpec("lm_head.weight", "output.weight", "lm_head", lambda c: (c.vocab_size, c.hidden_size),
                     ROWS_BY_VOCAB)  # not part of a model whose embedding is tied: the table serves as both

LAYER_WEIGHTS = (
    WeightSpec("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", "attn_norm", _d, REPLICATED),
    WeightSpec("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", "q",
               lambda c: (_q_out(c), c.hidden_size), ROWS_BY_HEAD),
    WeightSpec("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias", "q_bias",
               lambda c: (_q_out(c),), ROWS_BY_HEAD, optional=True),
    WeightSpec("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", "k",
               lambda c: (_kv_out(c), c.hidden_size), ROWS_BY_KV_HEAD),
    WeightSpec("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias", "k_bias",
               lambda c: (_kv_out(c),), ROWS_BY_KV_HEAD, optional=True),
    WeightSpec("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", "v",
               lambda c: (_kv_out(c), c.hidden_size), ROWS_BY_KV_HEAD),
    WeightSpec("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias", "v_bias",
               lambda c: (_kv_out(c),), ROWS_BY_KV_HEAD, optional=True),
    WeightSpec("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", "o",
               lambda c: (c.hidden_size, _q_out(c)), COLUMNS_BY_HEAD),
    WeightSpec("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", "ffn_norm", _d,
               REPLICATED),
    WeightSpec("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", "gate",
               lambda c: (c.intermediate_size, c.hidden_size), ROWS_BY_FFN),
    WeightSpec("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", "up",
               lambda c: (c.intermediate_size, c.hidden_size), ROWS_BY_FFN),
    WeightSpec("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", "down",
               lambda c: (c.hidden_size, c.intermediate_size), COLUMNS_BY_FFN),
)


@dataclass(frozen=True)
class Weight:
    """One tensor of a model: its kind, and its layer (None for the global ones)."""

    spec: WeightSpec
    layer: int | None = None

    @property
    def hf_name(self) -> str:
        """Its Hugging Face name."""
        return self.spec.hf.format(i=self.layer)

    @property
    def gguf_name(self) -> str:
        """Its name in a GGUF file."""
        return self.spec.gguf.format(i=self.layer)

    def shape(self, config: ModelConfig) -> tuple[int, ...]:
        """Its full (unsharded) shape."""
        return self.spec.shape(config)


def model_weights(config: ModelConfig) -> Iterator[Weight]:
    """Every tensor of a Qwen2 model of this config: the global ones, then layer by layer. Lazily:
    a hostile config may claim billions of layers, and checks stop at the first missing tensor."""
    heads = (EMBED_TOKENS, FINAL_NORM) if config.tie_word_embeddings else (EMBED_TOKENS, FINAL_NORM, LM_HEAD)
    yield from (Weight(spec) for spec in heads)
    for i in range(config.num_hidden_layers):
        yield from (Weight(spec, i) for spec in LAYER_WEIGHTS)

