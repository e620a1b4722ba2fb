"""Tensor parallelism: which slice of every weight a rank holds (Megatron layout, on CPU).

Attention: q/k/v are column-parallel by heads (biases with them), o_proj row-parallel by its input
columns. MLP: gate/up column-parallel by intermediate columns, down_proj row-parallel. The vocabulary
is split by rows for both lm_head (each rank computes only its logits) and the embedding (each rank
holds 1/N of the table; the rank owning a token supplies its row and the others add zeros, which
costs one small all-reduce per step but saves (N-1)/N of a table that is 27% of this model).
Which tensor is split which way is the weight table's `split` column (model/weights.py).

Head counts need not divide by N: ranks get contiguous, uneven head ranges, and each holds every
key/value head its query heads read (replicated when N exceeds the number of KV heads). With more
ranks than heads (or MLP units), the last ranks hold none and add zeros to those sums: attention is a
small share of the weights, so the MLP and the vocabulary still split N ways.
Row-parallel sums are joined in fixed-point blocks (see native/ops.hpp) whose bounds never move with N,
and the row-parallel splits fall on whole units of heads and MLP columns, so that no block of a
quantized o_proj or down_proj straddles two ranks.
"""
import math
from dataclasses import asdict, dataclass

from .. import _native
from ..errors import LlaisysError
from ..model.checkpoint import StoredTensor
from ..model.config import ModelConfig
from ..model.weights import Weight


def split(n: int, parts: int, index: int) -> tuple[int, int]:
    """[begin, end) of part `index` when n items are cut into `parts` contiguous runs, larger first."""
    base, extra = divmod(n, parts)
    begin = index * base + min(index, extra)
    return begin, begin + base + (index < extra)


def reduction_block(intermediate_size: int) -> int:
    """Width of down_proj's fixed-point blocks: the widest even divisor up to 256 that still leaves
    32 blocks. It depends on the model only, never on N. Ranks hold whole blocks and every layer's
    all-reduce waits for the rank with the most, so blocks must be many: the 0.5B model's 4864
    columns in blocks of 256 gave 2 ranks 10 and 9 (the first rank's MLP 11-15% slower, the other
    waiting) and 8 ranks 3 or 2; in blocks of 128 (38) 2 ranks get 19 each and 8 at most 5 (4.75 on
    average). Wider blocks need fewer fixed-point conversions (one per block per output): a prompt's
    exact down_proj took 2.2 ms in blocks of 256, 2.35 in 128 and 3.0 in 64 (223 tokens, half the
    0.5B MLP, 1 thread)."""
    divisors = [b for b in (256, 128, 64, 32, 16, 8, 4, 2) if intermediate_size % b == 0]
    return next((b for b in divisors if intermediate_size // b >= 32), divisors[-1])


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
    def for_rank(cls, config: ModelConfig, rank: int, size: int, head_unit: int = 1, ffn_unit: int = 1) -> "ShardPlan":
        """Rank `rank` of `size`: contiguous heads in whole units of `head_unit` heads, whole
        fixed-point blocks of the MLP (also whole units of `ffn_unit` columns), a run of vocabulary."""
        if size > config.vocab_size:
            raise LlaisysError(f"this model can be split over at most {config.vocab_size} ranks, not {size}")
        block = math.lcm(reduction_block(config.intermediate_size), ffn_unit)
        head_range = _units(config.num_attention_heads, head_unit)
        ffn_range = _units(config.intermediate_size, block)
        head_begin, head_end = (head_range[i] for i in split(len(head_range) - 1, size, rank))
        ffn_begin, ffn_end = (ffn_range[i] for i in split(len(ffn_range) - 1, size, rank))
        group = config.num_attention_heads // config.num_key_value_heads
        kv_begin, kv_end = (head_begin // group, (head_end - 1) // group + 1) if head_end > head_begin else (0, 0)
        vocab_begin, vocab_end = split(config.vocab_size, size, rank)
        return cls(head_begin, head_end, kv_begin, kv_end, ffn_begin, ffn_end, vocab_begin, vocab_end, block)

    def bounds(self) -> dict[str, int]:
        """The shard's [begin, end) ranges by name (head_begin, head_end, ...)."""
        fields = asdict(self)
        del fields["ffn_block"]
        return fields

    def native(self) -> "_native.Shard":
        """The shard bounds as the native model takes them."""
        return _native.Shard(**self.bounds())

    def slice_of(self, weight: Weight, stored: StoredTensor, config: ModelConfig) -> StoredTensor:
        """This rank's view of one full tensor, as the weight table says it is split."""
        split_ = weight.spec.split
        if split_.axis is None:
            return stored
        hd = config.head_dim
        held = {"head": slice(self.head_begin * hd, self.head_end * hd),
                "kv_head": slice(self.kv_begin * hd, self.kv_end * hd),
                "ffn": slice(self.ffn_begin, self.ffn_end),
                "vocab": slice(self.vocab_begin, self.vocab_end)}[split_.over]
        return stored.rows(held) if split_.axis == 0 else stored.columns(held)


def _units(n: int, unit: int) -> list[int]:
    """Bounds of n items cut into whole units (the last one may be short)."""
    return list(range(0, n, unit)) + [n]
