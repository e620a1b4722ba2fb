"""Sampled tokens follow the exact filtered softmax (chi-square tests on a small vocabulary)."""
import numpy as np
import pytest

from llaisys_chat.engine.collectives import SingleProcess
from llaisys_chat.engine.sampling import STOP, choose_token
from llaisys_chat.errors import LlaisysError
from llaisys_chat.protocol.sampling import SamplingParams

# Chi-square critical values at significance 0.001, by degrees of freedom.
CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59, 11: 31.26}
LOGITS = np.array([2.0, 1.5, 0.3, -0.5, 1.9, -2.0, 0.0, 1.0, -1.0, 0.7, 0.1, 0.5], dtype=np.float32)


def exact_distribution(logits, temperature, top_k, top_p):
    """transformers' order: softmax(logits / T), keep the top k, renormalise, keep the nucleus, renormalise."""
    order = np.lexsort((np.arange(len(logits)), -logits))
    if top_k:
        order = order[:top_k]
    z = logits[order].astype(np.float64) / temperature
    p = np.exp(z - z.max())
    if top_k:
        p /= p.sum()
    else:
        p /= np.exp(logits.astype(np.float64) / temperature - z.max()).sum()
    if top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1
        order, p = order[:keep], p[:keep]
    dist = np.zeros(len(logits))
    dist[order] = p / p.sum()
    return dist


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 4, 1.0), (1.0, 0, 0.6), (0.7, 6, 0.8), (1.5, 0, 0.9),
])
def test_sampled_frequencies_match_the_filtered_softmax(temperature, top_k, top_p):
    draws = 20000
    counts = np.zeros(len(LOGITS))
    for step in range(draws):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=1234)
        counts[choose_token(LOGITS, 0, params, step, SingleProcess())] += 1
    expected = exact_distribution(LOGITS, temperature, top_k, top_p) * draws
    assert np.all(counts[expected == 0] == 0), "a filtered-out token was sampled"
    live = expected > 0
    chi2 = float((((counts - expected) ** 2)[live] / expected[live]).sum())
    assert chi2 < CRITICAL[int(live.sum()) - 1], (chi2, counts, expected)


def test_vocab_offset_maps_to_global_ids():
    params = SamplingParams(temperature=0.0)
    assert choose_token(LOGITS, 1000, params, 0, SingleProcess()) == 1000


def test_stop_request_wins_the_collective():
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, top_k=3, seed=1),
                   SamplingParams(temperature=1.0, top_p=0.5, seed=1)):
        assert choose_token(LOGITS, 0, params, 0, SingleProcess(), stop_requested=True) == STOP


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5), dict(seed=-1)])
def test_bad_parameters_are_user_errors(bad):
    with pytest.raises(LlaisysError):
        SamplingParams(**bad)
