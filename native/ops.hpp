// The operators of a Qwen2 forward pass, as free functions: out parameters first, then inputs.
// Arithmetic is f32; any float tensor may be f32, f16 or bf16 unless a comment says otherwise.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "tensor.hpp"

namespace llaisys::ops {

// out[m] = table[ids[m] - vocab_begin] when the id falls in this table's rows, else zeros; the table
// may be of any float or quantized type.
// (A vocab-parallel table holds rows [vocab_begin, vocab_begin + rows) of the full vocabulary.)
void embedding(Tensor& out /*[M, D]*/, const Tensor& ids /*[M] i32|i64*/, const Tensor& table /*[V, D]*/,
               int64_t vocab_begin);

// A weight W[n_out, n_in] repacked once at load for the matmul kernels (layouts in ops/panels.hpp):
// panels of kPanel output rows, kGroup panels interleaved, so that a decode tile (one group) streams
// through one contiguous run of memory. bf16 keeps k-pairs together ([kPanel][2], the layout
// dot-product-of-pairs instructions consume); quantized types keep their blocks' integers and scales,
// so the kernels compute integer dot products against activations quantized per block of 32.
// A fused weight (q|k|v, gate|up) is a list of parts, each with its own type, one after another in
// the output. Padding rows, columns and panels are zero.
constexpr int64_t kPanel = 16;
constexpr int64_t kGroup = 4;
struct PackedPart {
    DType dtype = DType::BF16;  // BF16, F32 or a quantized type
    int64_t row_begin = 0;      // where this part's rows start in the fused output
    int64_t n_out = 0;
    Tensor panels;
};
struct PackedWeight {
    std::vector<PackedPart> parts;
    int64_t n_out = 0;
    int64_t n_in = 0;
    size_t nbytes() const;
};
// W (any float or quantized dtype) in panels of `dtype`: BF16 or F32, the same quantized type as W,
// or Q8_0 / Q4_0 (quantized now, from whatever W holds).
PackedWeight pack_weight(const Tensor& w /*[n_out, n_in]*/, DType dtype);
// Fuses W's rows after those already packed (same n_in).
void append_rows(PackedWeight& fused, const Tensor& w, DType dtype);

// out = x W^T + bias. With bf16 weights, x is rounded to bf16 and products accumulate in f32; with
// quantized weights, x is quantized per block of 32 to int8 (quant::quantize_activations).
void linear(Tensor& out /*[M, n_out]*/, const Tensor& x /*[M, n_in]*/, const PackedWeight& w,
            const Tensor* bias /*[n_out] or null*/);

// The AMX tiles linear() uses on this CPU with this build: "int8" (prompts on quantized weights),
// "bf16" (bf16 weights), both ("int8+bf16") or "none".
std::string amx_tiles();

// Fixed-point partial sums for row-parallel layers: out += round(x W^T) in units of 2^-32 (to nearest), where
// every k_block-wide slice of n_in contributes its own f32 dot product rounded to fixed point.
// Integer addition is associative, so summing these partials across any split of n_in into
// whole blocks (ranks) gives bit-identical results: generation does not depend on the rank count.
constexpr double kFixedOne = 4294967296.0;  // 2^32
void linear_fixed(Tensor& out /*[M, n_out] i64, accumulated*/, const Tensor& x /*[M, n_in]*/,
                  const PackedWeight& w, int64_t k_block);
// x += in converted from fixed point (each value rounded to f32, then added).
void add_from_fixed(Tensor& x /*[...] f32*/, const Tensor& in /*[...] i64*/);

// out = x / sqrt(mean(x^2) + eps) * weight, over the last dimension.
void rms_norm(Tensor& out, const Tensor& x, const Tensor& weight, float eps);

// Rotary embedding, NeoX layout (the two halves of each head rotate together), in f32:
// angle(p, i) = positions[p] * theta^(-2i / head_dim). rope_angles() gives each position's cosines
// then sines, computed once per step for every layer and head.
void rope_angles(Tensor& out /*[M, head_dim] f32*/, const Tensor& positions /*[M] i64*/, float theta);
void rope(Tensor& out /*[M, H, head_dim]*/, const Tensor& x /*[M, H, head_dim]*/, const Tensor& angles /*[M, head_dim]*/);

// Causal grouped-query attention of M new queries at positions n_past .. n_past+M-1 against a
// cache that already holds their keys and values. Query head h reads cache head kv_head_of[h].
void self_attention(Tensor& out /*[M, H, d]*/, const Tensor& q /*[M, H, d]*/,
                    const Tensor& k_cache /*[H_kv, capacity, d]*/, const Tensor& v_cache /*[H_kv, capacity, d]*/,
                    const std::vector<int64_t>& kv_head_of, int64_t n_past, float scale);

// out = silu(gate) * up
void swiglu(Tensor& out, const Tensor& gate, const Tensor& up);

// out = a + b
void add(Tensor& out, const Tensor& a, const Tensor& b);

// (max value, lowest index holding it) of a 1-D tensor; NaN counts as -inf.
std::pair<float, int64_t> argmax(const Tensor& x);

// Sampling over a vocabulary shard whose first row is global token id `id_offset`.
// Noise comes from a counter-based generator keyed on (seed, step, global id): the same token
// gets the same noise whichever rank holds it.
float gumbel_noise(uint64_t seed, uint64_t step, int64_t token_id);
std::vector<float> gumbel_noise(uint64_t seed, uint64_t step, const std::vector<int64_t>& token_ids);
// Gumbel-max: (max of x*inv_temperature + noise, its global id). Equals a sample of softmax(x/T).
std::pair<float, int64_t> gumbel_argmax(const Tensor& x, float inv_temperature, uint64_t seed,
                                        uint64_t step, int64_t id_offset);
// The k largest values, highest first (ties: lower index first), with their indices.
std::pair<std::vector<float>, std::vector<int64_t>> top_k(const Tensor& x, int64_t k);

}  // namespace llaisys::ops
