"""Each native op against a numpy reference, over several shapes and the three float dtypes."""
import numpy as np
import pytest
from tiny import to_bf16_bits

from llaisys_chat import _native

DTYPES = ["f32", "f16", "bf16"]
# Relative tolerance of a result stored in each dtype (a few units of its last place).
TOL = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.6e-2}


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """x in the engine's representation of dtype (bf16 as uint16 bits)."""
    if dtype == "bf16":
        return to_bf16_bits(x)
    return x.astype(np.float16 if dtype == "f16" else np.float32)


def values(a: np.ndarray) -> np.ndarray:
    """The float64 values an array in engine representation holds."""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def empty(shape, dtype):
    return stored(np.zeros(shape, np.float32), dtype)


def assert_close(actual, expected, dtype, scale=None):
    actual, expected = values(actual), np.asarray(expected, np.float64)
    scale = scale if scale is not None else max(np.abs(expected).max(), 1e-6)
    assert np.abs(actual - expected).max() <= TOL[dtype] * scale * 4, np.abs(actual - expected).max() / scale


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,dim,vocab_begin", [(10, 8, 0), (37, 24, 0), (50, 16, 20)])
def test_embedding(dtype, vocab, dim, vocab_begin):
    table = stored(rng().standard_normal((vocab, dim)).astype(np.float32), dtype)
    ids = np.array([vocab_begin, vocab_begin + vocab - 1, 0, vocab_begin + 3, vocab_begin + vocab + 5], np.int64)
    out = empty((len(ids), dim), dtype)
    _native.embedding(out, ids, table, vocab_begin)
    expected = np.zeros((len(ids), dim))
    for m, i in enumerate(ids):
        if vocab_begin <= i < vocab_begin + vocab:
            expected[m] = values(table)[i - vocab_begin]
    assert np.array_equal(values(out), expected)  # a lookup is exact
    _native.embedding(out, ids.astype(np.int32), table, vocab_begin)
    assert np.array_equal(values(out), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pack", [_native.DType.BF16, _native.DType.F32], ids=["bf16", "f32"])
@pytest.mark.parametrize("M,K,N", [(1, 16, 16), (3, 40, 37), (9, 64, 100), (17, 130, 33), (1, 7, 5), (20, 96, 40), (45, 64, 70)])
def test_linear(dtype, pack, M, K, N):
    r = rng(M * K + N)
    x = stored(r.standard_normal((M, K)).astype(np.float32), dtype)
    w = stored(r.standard_normal((N, K)).astype(np.float32), dtype)
    b = stored(r.standard_normal(N).astype(np.float32), dtype)
    out = empty((M, N), dtype)
    _native.linear(out, x, _native.pack_weight(w, pack), b)
    # bf16 panels multiply bf16 operands: the reference rounds x and W the same way.
    rounded = (lambda a: values(to_bf16_bits(values(a).astype(np.float32)))) if pack == _native.DType.BF16 else values
    expected = rounded(x) @ rounded(w).T + values(b)
    assert_close(out, expected, dtype, scale=np.sqrt(K) + np.abs(expected).max())


@pytest.mark.parametrize("pack", [_native.DType.BF16, _native.DType.F32], ids=["bf16", "f32"])
# (2, 512, 70, 16): enough k blocks (32) for linear_fixed to cut a decode tile in k itself.
@pytest.mark.parametrize("M,K,N,block", [(1, 64, 48, 16), (5, 128, 33, 32), (12, 96, 20, 8), (40, 192, 70, 64), (2, 512, 70, 16)])
def test_linear_fixed_is_exact_over_any_split(pack, M, K, N, block):
    r = rng(K)
    x = r.standard_normal((M, K)).astype(np.float32)
    w = r.standard_normal((N, K)).astype(np.float32)
    whole = np.zeros((M, N), np.int64)
    _native.linear_fixed(whole, x, _native.pack_weight(w, pack), block)
    # The same product split into two and three shards of whole blocks, summed as integers.
    n_blocks = K // block
    for cuts in ([0, n_blocks // 2, n_blocks], [0, 1, n_blocks - 1, n_blocks]):
        parts = np.zeros((M, N), np.int64)
        for a, b in zip(cuts, cuts[1:]):
            cols = slice(a * block, b * block)
            _native.linear_fixed(parts, np.ascontiguousarray(x[:, cols]), _native.pack_weight(np.ascontiguousarray(w[:, cols]), pack), block)
        assert np.array_equal(parts, whole)
    result = np.zeros((M, N), np.float32)
    _native.add_from_fixed(result, whole)
    rounded = (lambda a: values(to_bf16_bits(a))) if pack == _native.DType.BF16 else values
    expected = rounded(x) @ rounded(w).T
    assert np.abs(result - expected).max() < 1e-4 * np.sqrt(K)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 16), (4, 96), (7, 33)])
def test_rms_norm(dtype, rows, dim):
    r = rng(dim)
    x = stored(r.standard_normal((rows, dim)).astype(np.float32) * 3, dtype)
    w = stored(r.standard_normal(dim).astype(np.float32), dtype)
    out = empty((rows, dim), dtype)
    _native.rms_norm(out, x, w, 1e-6)
    xv = values(x)
    expected = xv / np.sqrt((xv * xv).mean(-1, keepdims=True) + 1e-6) * values(w)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H,d,theta", [(1, 2, 8, 10000.0), (5, 3, 16, 1e6), (9, 1, 64, 10000.0)])
def test_rope(dtype, M, H, d, theta):
    from reference import rope

    x = stored(rng(d).standard_normal((M, H, d)).astype(np.float32), dtype)
    positions = np.array([0, 1, 7, 100, 5000, 3, 2, 9, 1000][:M], np.int64)
    out = empty((M, H, d), dtype)
    angles = np.empty((M, d), np.float32)
    _native.rope_angles(angles, positions, theta)
    _native.rope(out, x, angles)
    # Large positions amplify f32 angle rounding (the engine follows transformers' f32 math).
    assert_close(out, rope(values(x), positions.astype(np.float64), theta), dtype, scale=1e2 if dtype == "f32" else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H,H_kv,d,n_past,capacity", [(1, 2, 1, 8, 0, 4), (4, 4, 2, 16, 3, 10), (6, 6, 3, 8, 0, 6), (1, 14, 2, 64, 20, 32),
                                                          (9, 2, 1, 16, 0, 9), (12, 4, 2, 64, 5, 24), (1, 12, 2, 128, 40, 48),
                                                          (1, 6, 2, 48, 30, 32)])
def test_self_attention(dtype, M, H, H_kv, d, n_past, capacity):
    from reference import attention

    r = rng(H * d + n_past)
    T = n_past + M
    k = r.standard_normal((T, H_kv, d)).astype(np.float32)
    v = r.standard_normal((T, H_kv, d)).astype(np.float32)
    k_cache, v_cache = empty((H_kv, capacity, d), dtype), empty((H_kv, capacity, d), dtype)
    k_cache[:, :T] = stored(k.transpose(1, 0, 2), dtype)
    v_cache[:, :T] = stored(v.transpose(1, 0, 2), dtype)
    q = stored(r.standard_normal((M, H, d)).astype(np.float32), dtype)
    out = empty((M, H, d), dtype)
    group = H // H_kv
    _native.self_attention(out, q, k_cache, v_cache, [h // group for h in range(H)], n_past, 1 / np.sqrt(d))
    expected = attention(values(q), values(k_cache[:, :T]).transpose(1, 0, 2), values(v_cache[:, :T]).transpose(1, 0, 2), n_past)
    assert_close(out, expected, dtype)


def test_self_attention_of_no_heads_does_nothing():
    """A rank of more ranks than heads holds no query or key/value heads: its call is empty, not an error."""
    q, out = np.zeros((1, 0, 64), np.float32), np.zeros((1, 0, 64), np.float32)
    cache = np.zeros((0, 8, 64), np.float32)
    _native.self_attention(out, q, cache, cache, [], 3, 0.125)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("d", [16, 48, 64, 128])
def test_self_attention_bits_do_not_depend_on_the_call(dtype, d):
    """A prefill's queries (many per call: heads widened once) give the very bits they give one per
    call (decode, which reads each key/value head once for a group of query heads, a vector of keys
    at once, then the rest one by one), so a prompt's keys are the same whether it came alone, in
    chunks or batched."""
    r = rng(d)
    M, H, H_kv, n_past = 20, 6, 2, 37
    k_cache, v_cache = (stored(r.standard_normal((H_kv, n_past + M, d)).astype(np.float32), dtype) for _ in range(2))
    q = stored(r.standard_normal((M, H, d)).astype(np.float32), dtype)
    heads = [h // 3 for h in range(H)]
    together = empty((M, H, d), dtype)
    _native.self_attention(together, q, k_cache, v_cache, heads, n_past, 0.125)
    for m in range(M):
        alone = empty((1, H, d), dtype)
        _native.self_attention(alone, q[m:m + 1], k_cache, v_cache, heads, n_past + m, 0.125)
        np.testing.assert_array_equal(alone[0], together[m])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 8), (3, 100)])
def test_swiglu(dtype, rows, dim):
    r = rng(dim)
    gate = stored(r.standard_normal((rows, dim)).astype(np.float32) * 3, dtype)
    up = stored(r.standard_normal((rows, dim)).astype(np.float32), dtype)
    out = empty((rows, dim), dtype)
    _native.swiglu(out, gate, up)
    g = values(gate)
    assert_close(out, g / (1 + np.exp(-g)) * values(up), dtype)


def test_swiglu_bits_do_not_depend_on_the_column():
    # Each value is computed alone, in any lane of a vector or of a padded last one: the MLP's
    # shards then give the same bits for any rank count.
    r = rng(7)
    gate = np.concatenate([np.linspace(-100, 100, 41), r.standard_normal(40) * 4]).astype(np.float32)[None]
    up = r.standard_normal(gate.shape).astype(np.float32)
    whole = np.empty_like(gate)
    _native.swiglu(whole, gate, up)
    for begin, end in [(0, 1), (3, 20), (5, 81), (64, 81)]:
        part = np.empty((1, end - begin), np.float32)
        _native.swiglu(part, np.ascontiguousarray(gate[:, begin:end]), np.ascontiguousarray(up[:, begin:end]))
        np.testing.assert_array_equal(part, whole[:, begin:end])
    g = gate.astype(np.float64)
    np.testing.assert_allclose(whole, g / (1 + np.exp(-g)) * up, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (4, 33), (2, 3, 16)])
def test_add(dtype, shape):
    r = rng(len(shape))
    a = stored(r.standard_normal(shape).astype(np.float32), dtype)
    b = stored(r.standard_normal(shape).astype(np.float32), dtype)
    out = empty(shape, dtype)
    _native.add(out, a, b)
    assert_close(out, values(a) + values(b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_takes_the_lowest_index_of_ties(dtype):
    x = stored(np.array([1.0, 5.0, -2.0, 5.0, 3.0, np.nan], np.float32), dtype)
    assert _native.argmax(x) == (5.0, 1)
    big = stored(rng().standard_normal(1000).astype(np.float32), dtype)
    assert _native.argmax(big)[1] == int(np.argmax(values(big)))
    # Ties and NaNs in different vector lanes and in the tail, and rows with nothing above -inf.
    row = np.full(1003, -4.0, np.float32)
    row[[7, 40, 1001]] = 2.5
    row[[3, 500, 1002]] = np.nan
    assert _native.argmax(stored(row, dtype)) == (2.5, 7)
    row[7] = row[40] = -4.0
    assert _native.argmax(stored(row, dtype)) == (2.5, 1001)
    assert _native.argmax(stored(np.array([np.nan, -np.inf, np.nan], np.float32), dtype)) == (-np.inf, 0)


def test_top_k_orders_by_value_then_index():
    x = np.array([3.0, 1.0, 3.0, 7.0, -1.0, 7.0, 2.0], np.float32)
    values_, indices = _native.top_k(x, 4)
    assert indices.tolist() == [3, 5, 0, 2] and values_.tolist() == [7.0, 7.0, 3.0, 3.0]
    assert _native.top_k(x, 100)[1].tolist() == [3, 5, 0, 2, 6, 1, 4]


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_gumbel_argmax_equals_brute_force(temperature):
    """The pruned race picks exactly the brute-force winner of logit/T + noise(seed, step, id)."""
    x = (rng().standard_normal(3000) * 8).astype(np.float32)
    inv_t = np.float32(1 / temperature)
    for step in range(20):
        noise = _native.gumbel_noise(7, step, np.arange(100, 100 + len(x)))
        score, token = _native.gumbel_argmax(x, inv_t, 7, step, 100)
        assert token == 100 + int(np.argmax(x * inv_t + noise))
        assert score == pytest.approx(float(np.max(x * inv_t + noise)))


def test_gumbel_argmax_on_a_vocabulary_with_ties_nans_and_infinities():
    """A vocabulary-sized row (its length not a multiple of 8), a tie at the top, NaNs and -inf: the
    winner is still the brute-force one, ties to the lowest id; a row of nothing but NaN and -inf
    gives -inf at the first id."""
    x = (rng().standard_normal(151_939) * 3).astype(np.float32)
    x[[10, 20_000]] = x.max() + 1  # two tokens tie for the largest logit
    x[[5, 77_777, 151_938]] = np.nan
    x[[6, 151_937]] = -np.inf
    ids = np.arange(1000, 1000 + len(x))
    for step in range(6):
        for inv_t in (np.float32(1.0), np.float32(1 / 0.7), np.float32(1 / 3.0)):
            scores = x * inv_t + _native.gumbel_noise(11, step, ids)
            score, token = _native.gumbel_argmax(x, inv_t, 11, step, 1000)
            assert token == 1000 + int(np.nanargmax(scores)) and score == float(np.nanmax(scores))
    assert _native.gumbel_argmax(np.array([np.nan, -np.inf], np.float32), 1.0, 1, 2, 50) == (-np.inf, 50)


def test_gumbel_noise_is_keyed_not_sequential():
    assert _native.gumbel_noise(1, 2, [3]) == _native.gumbel_noise(1, 2, [5, 3])[1:]
    draws = {float(_native.gumbel_noise(1, s, [t])[0]) for s in range(10) for t in range(10)}
    assert len(draws) == 100
    u = np.exp(-np.exp(-_native.gumbel_noise(5, 0, np.arange(20000)).astype(np.float64)))
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005  # uniform under the transform


def test_invariant_violation_raises_with_file_and_line():
    with pytest.raises(RuntimeError, match=r"linear\.cpp:\d+: linear: x has the wrong number of columns"):
        _native.linear(np.zeros((1, 3), np.float32), np.zeros((1, 5), np.float32), _native.pack_weight(np.zeros((3, 4), np.float32), _native.DType.F32))
