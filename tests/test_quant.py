"""Quantized weights (native/quant.cpp, ops/pack_weight.cpp, ops/linear_quant.cpp) against the gguf
package's numpy code (llama.cpp's formats) and a float64 reference."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from llaisys_chat import _native

TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K"]
SHAPES = [(1, 37, 256), (1, 64, 512), (3, 100, 256), (5, 16, 768), (9, 70, 256), (40, 100, 512)]  # M, N (rows), K


def rng(seed):
    return np.random.default_rng(seed)


def f16_bits(values) -> np.ndarray:
    return np.asarray(values, np.float16).view(np.uint8).reshape(-1, 2)


def random_blocks(name: str, rows: int, cols: int, r) -> np.ndarray:
    """uint8 [rows, row bytes] of valid blocks: quantized by the gguf package where it can, else random
    bits with sane f16 scales (the K types)."""
    qtype = GGMLQuantizationType[name]
    if name in ("Q8_0", "Q4_0", "Q5_0"):
        return quantize(r.standard_normal((rows, cols)).astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = r.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    if name == "Q4_K":  # d, dmin lead the block
        blocks[:, 0:2] = f16_bits(r.uniform(0.001, 0.02, len(blocks)))
        blocks[:, 2:4] = f16_bits(r.uniform(0.001, 0.02, len(blocks)))
    else:  # Q6_K: d ends the block
        blocks[:, -2:] = f16_bits(r.uniform(0.001, 0.02, len(blocks)))
    return blocks.reshape(rows, -1)


def quantized(name, blocks):
    return _native.QuantizedArray(blocks, getattr(_native.DType, name))


def activations_f64(x: np.ndarray) -> np.ndarray:
    """x as the kernels see it: quantized per 32 to int8 with scale max|x| / 127, rounding to even."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    q = np.rint(blocks * np.where(d == 0, 0, 1 / d).astype(np.float32))
    return (q * d).reshape(x.shape).astype(np.float64)


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_the_gguf_package(name):
    blocks = random_blocks(name, 6, 512, rng(1))
    expected = dequantize(blocks, GGMLQuantizationType[name])
    assert np.array_equal(_native.dequantize(quantized(name, blocks)), expected)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0"])
def test_quantize_matches_the_gguf_package(name):
    x = rng(2).standard_normal((7, 320)).astype(np.float32) * 3
    x[0, :32] = 0  # an all-zero block
    x[1, 5] = -x[1, :32].__abs__().max() * 2  # a negative extreme
    assert np.array_equal(_native.quantize(x, getattr(_native.DType, name)), quantize(x, GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_quantized_linear_matches_float64(name, M, N, K):
    r = rng(M * N + K)
    blocks = random_blocks(name, N, K, r)
    w = dequantize(blocks, GGMLQuantizationType[name]).astype(np.float64)
    x = r.standard_normal((M, K)).astype(np.float32)
    out = np.zeros((M, N), np.float32)
    _native.linear(out, x, _native.pack_weight(quantized(name, blocks), getattr(_native.DType, name)))
    expected = activations_f64(x) @ w.T
    assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("name,cols,rows", [(name, 512, 104) for name in TYPES] + [(name, 256, 2088) for name in TYPES]
                         + [("BF16", 512, 104), ("BF16", 40, 104), ("F32", 40, 104)])
def test_a_token_gets_the_same_bits_alone_in_a_batch_or_in_a_prompt(name, cols, rows):
    """Decode (up to four groups of rows per tile, single groups where threads share the last ones:
    2088 rows), a batch of 2 (two groups of rows per tile, the second one partial here), a batch of 3
    (a whole group of rows per tile) and a 40-token prompt (AMX tiles of 32
    tokens where the CPU has them, else one register of rows per tile, 8-row tails in 256-bit registers)
    sum the same integers and scale them in the same order. Float weights too: bf16 ones run on AMX
    tiles for every token count where the CPU has AMX-BF16 (and k is a multiple of 32)."""
    r = rng(11)
    dtype = getattr(_native.DType, name)
    if name in TYPES:
        w = _native.pack_weight(quantized(name, random_blocks(name, rows, cols, r)), dtype)
    else:
        w = _native.pack_weight(r.standard_normal((rows, cols)).astype(np.float32), dtype)
    x = r.standard_normal((40, cols)).astype(np.float32)
    prompt, batch = np.zeros((40, rows), np.float32), np.zeros((3, rows), np.float32)
    _native.linear(prompt, x, w)
    _native.linear(batch, x[:3], w)
    for m in range(40):
        alone = np.zeros((1, rows), np.float32)
        _native.linear(alone, x[m:m + 1], w)
        assert np.array_equal(alone[0], prompt[m])
    assert np.array_equal(batch, prompt[:3])
    pair = np.zeros((2, rows), np.float32)
    _native.linear(pair, x[:2], w)
    assert np.array_equal(pair, prompt[:2])


@pytest.mark.parametrize("name", ["BF16", "Q8_0"])
@pytest.mark.parametrize("cols,block", [(512, 64), (384, 128), (4864, 64)])
def test_exact_sums_of_a_few_tokens_match_the_prompts(name, cols, block):
    """linear_fixed's integer sums of 1, 2, 5 and 16 tokens equal those of the same tokens in a 40-token
    prompt: a few tokens take other tiles than a prompt (a whole group of rows; with 76 blocks of 70
    rows, k is also cut into runs shared by the threads), which must not change a bit."""
    r = rng(cols + block)
    dtype = getattr(_native.DType, name)
    values = r.standard_normal((70, cols)).astype(np.float32)
    w = _native.pack_weight(values if name == "BF16" else quantized(name, random_blocks(name, 70, cols, r)), dtype)
    x = r.standard_normal((40, cols)).astype(np.float32)
    prompt = np.zeros((40, 70), np.int64)
    _native.linear_fixed(prompt, x, w, block)
    for m in (1, 2, 5, 16):
        few = np.zeros((m, 70), np.int64)
        _native.linear_fixed(few, x[:m], w, block)
        assert np.array_equal(few, prompt[:m])


PROMPT_WITHOUT_AMX = """
import sys, numpy as np
sys.path.insert(0, "tests")
from test_quant import TYPES, prompt_products
from llaisys_chat import _native
assert _native.build_info()["amx"] == "none"
np.save(sys.argv[1], np.stack([prompt_products(name) for name in TYPES]))
"""


def prompt_products(name):
    r = rng(12)
    w = _native.pack_weight(quantized(name, random_blocks(name, 70, 768, r)), getattr(_native.DType, name))
    out = np.zeros((45, 70), np.float32)
    _native.linear(out, r.standard_normal((45, 768)).astype(np.float32), w)
    return out


def test_prompts_get_the_same_bits_with_or_without_amx(tmp_path):
    """LLAISYS_NO_AMX=1 keeps prompts on the dot-product kernels (what a CPU without AMX runs); on a CPU
    with AMX this compares the two kernels."""
    subprocess.run([sys.executable, "-c", PROMPT_WITHOUT_AMX, str(tmp_path / "out.npy")], check=True,
                   cwd=Path(__file__).parent.parent, env={**os.environ, "LLAISYS_NO_AMX": "1"})
    assert np.array_equal(np.load(tmp_path / "out.npy"), np.stack([prompt_products(name) for name in TYPES]))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0"])
def test_float_weights_quantize_when_packed(name):
    r = rng(3)
    w = r.standard_normal((50, 256)).astype(np.float32)
    x = r.standard_normal((4, 256)).astype(np.float32)
    dtype = getattr(_native.DType, name)
    direct, via_blocks = np.zeros((4, 50), np.float32), np.zeros((4, 50), np.float32)
    _native.linear(direct, x, _native.pack_weight(w, dtype))
    _native.linear(via_blocks, x, _native.pack_weight(quantized(name, _native.quantize(w, dtype)), dtype))
    assert np.array_equal(direct, via_blocks)


@pytest.mark.parametrize("target", ["F32", "BF16"])
def test_quantized_weights_dequantize_when_packed_as_floats(target):
    r = rng(4)
    blocks = random_blocks("Q4_K", 40, 512, r)
    x = r.standard_normal((3, 512)).astype(np.float32)
    out = np.zeros((3, 40), np.float32)
    _native.linear(out, x, _native.pack_weight(quantized("Q4_K", blocks), getattr(_native.DType, target)))
    w = dequantize(blocks, GGMLQuantizationType.Q4_K)
    tolerance = 1e-5 if target == "F32" else 1e-2
    assert np.abs(out - x @ w.T).max() <= tolerance * np.abs(x @ w.T).max()


def test_fused_parts_keep_their_own_types():
    r = rng(5)
    parts = [(quantized("Q4_K", random_blocks("Q4_K", 21, 256, r)), _native.DType.Q4_K),
             (r.standard_normal((9, 256)).astype(np.float32), _native.DType.BF16),
             (quantized("Q8_0", random_blocks("Q8_0", 33, 256, r)), _native.DType.Q8_0)]
    for M in (1, 6):
        x = r.standard_normal((M, 256)).astype(np.float32)
        fused = np.zeros((M, 63), np.float32)
        _native.linear(fused, x, _native.pack_fused(parts))
        separate = []
        for w, dtype in parts:
            out = np.zeros((M, w.shape[0]), np.float32)
            _native.linear(out, x, _native.pack_weight(w, dtype))
            separate.append(out)
        assert np.array_equal(fused, np.concatenate(separate, axis=1))


SHARED_WORK = """
import sys, numpy as np
sys.path.insert(0, "tests")
from test_quant import shared_work_products
np.save(sys.argv[1], shared_work_products())
"""


def shared_work_products():
    """One token through three fused Q4_0 parts with partial last groups, 20 times over: plain, and in
    fixed point with k cut into runs (64 k blocks of 64 values)."""
    r = rng(13)
    parts = [(quantized("Q4_0", random_blocks("Q4_0", rows, 4096, r)), _native.DType.Q4_0) for rows in (200, 72, 136)]
    w, x = _native.pack_fused(parts), r.standard_normal((1, 4096)).astype(np.float32)
    runs = []
    for _ in range(20):
        plain, fixed = np.zeros((1, 408), np.float32), np.zeros((1, 408), np.int64)
        _native.linear(plain, x, w)
        _native.linear_fixed(fixed, x, w, 64)
        runs.append(np.concatenate([plain.view(np.int32).astype(np.int64), fixed], axis=1))
    return np.stack(runs)


@pytest.mark.parametrize("threads", [7, 16])
def test_threads_sharing_the_last_units_give_the_same_bits(tmp_path, threads):
    """More threads than cores: threads lose their core mid-product, and the others take units from
    the back of their runs, across parts and runs of k. Every result matches one thread's."""
    def products(n):
        out = tmp_path / f"{n}.npy"
        subprocess.run([sys.executable, "-c", SHARED_WORK, str(out)], check=True, cwd=Path(__file__).parent.parent,
                       env={**os.environ, "OMP_NUM_THREADS": str(n)})
        return np.load(out)
    alone, shared = products(1), products(threads)
    assert np.count_nonzero(alone[0]) > 400  # every output written
    assert np.array_equal(shared, np.broadcast_to(alone[0], shared.shape))


@pytest.mark.parametrize("name", TYPES)
def test_fixed_point_partials_are_exact_over_any_split_on_blocks(name):
    r = rng(6)
    block = GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]
    K, N, M = 4 * block, 30, 3
    blocks = random_blocks(name, N, K, r)
    x = r.standard_normal((M, K)).astype(np.float32)
    dtype = getattr(_native.DType, name)
    whole = np.zeros((M, N), np.int64)
    _native.linear_fixed(whole, x, _native.pack_weight(quantized(name, blocks), dtype), 32)
    row_bytes = blocks.shape[1] // 4
    for cuts in ([0, 2, 4], [0, 1, 3, 4]):
        parts = np.zeros((M, N), np.int64)
        for a, b in zip(cuts, cuts[1:]):
            piece = quantized(name, np.ascontiguousarray(blocks[:, a * row_bytes:b * row_bytes]))
            _native.linear_fixed(parts, np.ascontiguousarray(x[:, a * block:b * block]), _native.pack_weight(piece, dtype), 32)
        assert np.array_equal(parts, whole)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("k_block", [32, 64, 96])
@pytest.mark.parametrize("M", [1, 3])
def test_fixed_point_runs_inside_and_across_256_value_blocks_match_float64(name, k_block, M):
    """linear_fixed cuts k into runs of k_block: for 256-value blocks a run starts and ends inside a
    block (32, 64), or crosses from one block into the next (96), so a tile begins and ends mid-block."""
    r = rng(14)
    K, N = 768, 40
    blocks = random_blocks(name, N, K, r)
    w = dequantize(blocks, GGMLQuantizationType[name]).astype(np.float64)
    x = r.standard_normal((M, K)).astype(np.float32)
    fixed, out = np.zeros((M, N), np.int64), np.zeros((M, N), np.float32)
    _native.linear_fixed(fixed, x, _native.pack_weight(quantized(name, blocks), getattr(_native.DType, name)), k_block)
    _native.add_from_fixed(out, fixed)
    expected = activations_f64(x) @ w.T
    assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()


def test_embedding_rows_from_a_quantized_table():
    blocks = random_blocks("Q5_0", 12, 64, rng(7))
    ids = np.array([3, 11, 20, 5], np.int32)  # 20 is another rank's row: zeros
    out = np.zeros((4, 64), np.float32)
    _native.embedding(out, ids, quantized("Q5_0", blocks), 0)
    table = dequantize(blocks, GGMLQuantizationType.Q5_0)
    assert np.array_equal(out, np.stack([table[3], table[11], np.zeros(64, np.float32), table[5]]))


def test_a_block_that_straddles_is_refused():
    with pytest.raises(RuntimeError, match="rows must be whole q4_k blocks"):
        _native.pack_weight(quantized("Q4_K", random_blocks("Q4_K", 4, 256, rng(8))[:, :100]), _native.DType.Q4_K)
