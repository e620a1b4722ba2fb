"""Choosing the next token when each rank holds only a slice of the vocabulary's logits.

No rank ever gathers the full logits vector. Every choice ends in a collective that all ranks enter
at every step, which is also where a stop request travels (see `choose_token`).

- Greedy: each rank's shard argmax, joined by one MAXLOC all-reduce (ties: lowest token id).
- Temperature: Gumbel-max. argmax_i(logit_i / T + g_i) with g_i Gumbel noise is an exact sample of
  softmax(logits / T); g_i comes from a counter-based generator keyed on (seed, step, token id),
  so a token's noise is the same whichever rank holds it, and N does not change the result.
- top-k: the global top k lies within the union of each shard's top k; ranks gather those few
  candidates, and all pick the same winner by Gumbel-max over them.
- top-p: probabilities need the global normaliser Z = sum exp(logit/T - max). Each rank adds its
  terms in fixed point and the integer sums are all-reduced, so Z is exact and N-independent;
  each shard then offers the prefix of its tokens whose mass could lie inside the nucleus.
"""
import numpy as np

from .. import _native
from ..protocol.sampling import SamplingParams

STOP = -1           # the token a rank offers when it was asked to stop: every rank then stops
_EXP_FIXED = 2.0 ** 40
_NEGLIGIBLE = 30.0  # tokens this far below the best scaled logit carry < e^-30 of its mass


def choose_token(logits: np.ndarray, vocab_begin: int, params: SamplingParams, step: int, group,
                 stop_requested: bool = False) -> int:
    """Collective: the token all ranks agree on for this step, or STOP if any rank asked to stop.

    `logits` is this rank's f32 slice, whose first entry is token `vocab_begin`; `params.seed`
    must be set (the same on every rank) when temperature > 0.
    """
    if params.temperature > 0 and (params.top_k > 0 or params.top_p < 1):
        return _choose_filtered(logits, vocab_begin, params, step, group, stop_requested)
    if params.temperature > 0:
        value, index = _native.gumbel_argmax(logits, 1.0 / params.temperature, params.seed, step, vocab_begin)
    else:
        value, index = _native.argmax(logits)
        index += vocab_begin
    if stop_requested:
        value, index = float("inf"), STOP
    return group.maxloc(value, index)[1]


def _choose_filtered(logits, vocab_begin, params, step, group, stop_requested) -> int:
    inv_t = np.float32(1.0 / params.temperature)
    if params.top_k > 0:
        values, indices = _native.top_k(logits, params.top_k)
        offers = group.allgather((stop_requested, values, indices + vocab_begin))
        if any(stop for stop, _, _ in offers):
            return STOP
        values, ids = _merge(offers, params.top_k)
        scaled = values * inv_t
        weights = np.exp((scaled - scaled[0]).astype(np.float64))
        probs = weights / weights.sum()  # renormalised over the top k, as transformers' warpers do
    else:
        scaled_all = logits * inv_t
        top = np.float32(group.max(float(scaled_all.max())))
        weights_all = np.exp((scaled_all - top).astype(np.float64))
        z = group.sum_int(_fixed_sum(weights_all)) / _EXP_FIXED
        offers = group.allgather((stop_requested, *_nucleus_offer(logits, scaled_all, weights_all, z, params.top_p, vocab_begin)))
        if any(stop for stop, _, _ in offers):
            return STOP
        values, ids = _merge(offers, None)
        scaled = values * inv_t
        probs = np.exp((scaled - top).astype(np.float64)) / z
    if params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1  # include the token crossing p
        values, ids, scaled = values[:keep], ids[:keep], scaled[:keep]
    noise = _native.gumbel_noise(params.seed, step, ids)
    return int(ids[int(np.argmax(scaled + noise))])


def _merge(offers, limit):
    """Candidates from all ranks, best first (value descending, then token id ascending)."""
    values = np.concatenate([v for _, v, _ in offers]).astype(np.float32)
    ids = np.concatenate([i for _, _, i in offers]).astype(np.int64)
    order = np.lexsort((ids, -values))[:limit]
    return values[order], ids[order]


def _fixed_sum(weights: np.ndarray) -> int:
    """Sum of weights in units of 2^-40, exact: each term is rounded alone, then added as integers."""
    return int(np.floor(weights * _EXP_FIXED).astype(np.int64).sum())


def _nucleus_offer(logits, scaled, weights, z, top_p, vocab_begin):
    """This shard's best tokens until their share of the global mass passes top_p.

    Any token of this shard inside the global nucleus is in this prefix: the shard's tokens above it
    are also in the nucleus, so their mass is below top_p.
    """
    candidates = np.flatnonzero(scaled >= scaled.max() - _NEGLIGIBLE)
    order = candidates[np.lexsort((candidates, -logits[candidates]))]
    mass = np.cumsum(weights[order]) / z
    keep = int(np.searchsorted(mass, top_p)) + 2  # +1 for the crossing token, +1 for rounding margin
    order = order[:keep]
    return logits[order], order + vocab_begin
