"""Tensor parallelism: which slice of every weight a rank holds (Megatron layout, on CPU).

Attention: q/k/v are column-parallel by heads (biases with them), o_proj row-parallel by its input
columns. MLP: gate/up column-parallel by intermediate columns, down_proj row-parallel. The vocabulary
is split by rows for both lm_head (each rank computes only its logits) and the embedding (each rank
holds 1/N of the table; the rank owning a token supplies its row and the others add zeros, which
costs one small all-reduce per step but saves (N-1)/N of a table that is 27% of this model).
Which tensor is split which way is the weight table's `split` column (model/weights.py).

Head counts need not divide by N: ranks get contiguous, uneven head ranges, and each holds every
key/value head its query heads read (replicated when N exceeds the number of KV heads).
Row-parallel sums are joined in fixed-point blocks (see native/ops.hpp) whose bounds never move with N.
"""
from dataclasses import asdict, dataclass

import numpy as np

from .. import _native
from ..errors import LlaisysError
from ..model.checkpoint import Checkpoint
from ..model.config import ModelConfig
from ..model.weights import Weight, model_weights


def split(n: int, parts: int, index: int) -> tuple[int, int]:
    """[begin, end) of part `index` when n items are cut into `parts` contiguous runs, larger first."""
    base, extra = divmod(n, parts)
    begin = index * base + min(index, extra)
    return begin, begin + base + (index < extra)


def reduction_block(intermediate_size: int) -> int:
    """Width of down_proj's fixed-point blocks: the widest even divisor up to 64 that still leaves
    16 blocks (so up to 16 ranks can share the MLP). It depends on the model only, never on N."""
    divisors = [b for b in (64, 32, 16, 8, 4, 2) if intermediate_size % b == 0]
    return next((b for b in divisors if intermediate_size // b >= 16), divisors[-1])


@dataclass(frozen=True)
class ShardPlan:
    """The slice of the model that one rank holds."""

    head_begin: int
    head_end: int
    kv_begin: int
    kv_end: int
    ffn_begin: int
    ffn_end: int
    vocab_begin: int
    vocab_end: int
    ffn_block: int

    @classmethod
    def for_rank(cls, config: ModelConfig, rank: int, size: int) -> "ShardPlan":
        """Rank `rank` of `size`: contiguous heads, whole reduction blocks of the MLP, a run of vocabulary."""
        block = reduction_block(config.intermediate_size)
        n_blocks = config.intermediate_size // block
        limit = min(config.num_attention_heads, n_blocks)
        if size > limit:
            raise LlaisysError(f"this model can be split over at most {limit} ranks, not {size}")
        head_begin, head_end = split(config.num_attention_heads, size, rank)
        group = config.num_attention_heads // config.num_key_value_heads
        block_begin, block_end = split(n_blocks, size, rank)
        vocab_begin, vocab_end = split(config.vocab_size, size, rank)
        return cls(head_begin, head_end, head_begin // group, (head_end - 1) // group + 1,
                   block_begin * block, block_end * block, vocab_begin, vocab_end, block)

    def bounds(self) -> dict[str, int]:
        """The shard's [begin, end) ranges by name (head_begin, head_end, ...)."""
        fields = asdict(self)
        del fields["ffn_block"]
        return fields

    def native(self) -> "_native.Shard":
        """The shard bounds as the native model takes them."""
        return _native.Shard(**self.bounds())

    def slice_of(self, weight: Weight, array: np.ndarray, config: ModelConfig) -> np.ndarray:
        """This rank's view of one full tensor, as the weight table says it is split."""
        split_ = weight.spec.split
        if split_.axis is None:
            return array
        hd = config.head_dim
        held = {"head": slice(self.head_begin * hd, self.head_end * hd),
                "kv_head": slice(self.kv_begin * hd, self.kv_end * hd),
                "ffn": slice(self.ffn_begin, self.ffn_end),
                "vocab": slice(self.vocab_begin, self.vocab_end)}[split_.over]
        return array[held] if split_.axis == 0 else array[:, held]

    def slice_weights(self, checkpoint: Checkpoint, config: ModelConfig) -> dict[Weight, np.ndarray]:
        """This rank's views of the memory-mapped weights the checkpoint holds; only they will ever be read."""
        return {w: self.slice_of(w, checkpoint[w.hf_name], config)
                for w in model_weights(config) if w.hf_name in checkpoint}
