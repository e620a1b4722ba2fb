// GGUF's block-quantized formats, as llama.cpp writes them, and conversions to and from f32.
// A block holds 32 (Q8_0, Q4_0, Q5_0) or 256 (Q4_K, Q6_K) consecutive values of a row.
#pragma once

#include <cstdint>

#include "tensor.hpp"

namespace llaisys::quant {

// value = d * q
struct BlockQ8_0 {
    uint16_t d;     // f16
    int8_t qs[32];
};
// value = d * (q - 8); q[i] is the low nibble of qs[i], q[i + 16] the high one
struct BlockQ4_0 {
    uint16_t d;
    uint8_t qs[16];
};
// value = d * (q - 16); q's low 4 bits as in Q4_0, bit 4 of q[i] is bit i of qh
struct BlockQ5_0 {
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[16];
};
// 8 sub-blocks of 32: value = d * sc[j] * q - dmin * m[j], 6-bit sc and m packed in `scales`;
// q of sub-blocks 2c and 2c+1 are the low and high nibbles of qs[32c .. 32c+31]
struct BlockQ4_K {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[128];
};
// 16 groups of 16: value = d * scales[g] * (q - 32), q 6 bits (see dequantize_row for the layout)
struct BlockQ6_K {
    uint8_t ql[128];
    uint8_t qh[64];
    int8_t scales[16];
    uint16_t d;
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ5_0) == 22 &&
              sizeof(BlockQ4_K) == 144 && sizeof(BlockQ6_K) == 210, "GGUF block sizes");

// Sub-block j's 6-bit scale and min of a Q4_K block.
void q4_k_scale_min(const uint8_t* scales, int j, uint8_t* sc, uint8_t* m);

// The unsigned integer values of one block (Q4_K, Q6_K: before scales and offsets), in order.
void block_values(DType type, const std::byte* block, uint8_t* q);

// dst[0..n) = the values of n / block consecutive blocks of `type` (any float or quantized type).
void dequantize_row(DType type, const std::byte* src, float* dst, int64_t n);

// n values (whole blocks) quantized to Q8_0 or Q4_0, rounding exactly as llama.cpp's reference code.
void quantize_row(DType type, const float* src, std::byte* dst, int64_t n);

// Activations quantized per 32 for the integer matrix kernels: value = d * q. The sums of q over
// each half let the kernels take the weights' offsets out of their integer dot products.
struct ActivationBlock {
    int8_t q[32];
    float d;
    int16_t sum[2];  // over q[0..16) and q[16..32)
};
// Block b of x goes to out[b * stride].
void quantize_activations(const float* x, ActivationBlock* out, int64_t n, int64_t stride = 1);

}  // namespace llaisys::quant
