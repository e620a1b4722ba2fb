// How pack_weight lays out a weight, shared with the matrix kernels that read it.
//
// Rows come in panels of kPanel (16), and kGroup (4) panels are interleaved so that a decode tile
// (one group) streams through one contiguous run of memory.
//
// Float panels (BF16, F32) interleave per k step: [group][k or k/2][kGroup][kPanel][(2)] (ops.hpp).
//
// Quantized panels interleave per block of the weight's type: the chunk of panel p of group g for
// block b lies at (g * n_blocks * kGroup + b * kGroup + p) * chunk bytes. Inside a chunk, values
// come in steps of 4 consecutive k for the 16 rows, 64 bytes a step, byte r * 4 + i holding row r's
// value at k = 4 * step + i: the order that integer dot products consume (bytes 0-31 are rows 0-7).
#pragma once

#include <cstdint>

#include "../ops.hpp"

namespace llaisys::ops::panels {

// Where each part of a chunk starts, in bytes. 4-bit values are stored two steps to a 64-byte
// "pair": step 2j in the low nibbles, step 2j + 1 in the high ones.
struct QuantLayout {
    int64_t block;        // values per block (per row)
    int64_t chunk;        // bytes of one panel's block
    int64_t d;            // f16 scale per row [16]
    int64_t dmin;         // Q4_K: f16 min scale per row [16]
    int64_t sub_scales;   // Q4_K: u8 [8 sub-blocks][16 rows]; Q6_K: i8 [16 groups][16 rows]
    int64_t sub_mins;     // Q4_K: u8 [8][16]
    int64_t values;       // Q8_0: int8 steps; the others: nibble pairs
    int64_t high_bits;    // Q5_0: byte r*4+i holds bit 4 of the value of step s in its bit s (8 steps);
                          // Q6_K: one 64-byte plane per 4 steps, the top 2 bits of step s' at bits 2s'..2s'+1
};

constexpr QuantLayout layout(DType type) {
    switch (type) {
        case DType::Q8_0: return {32, 544, 0, -1, -1, -1, 32, -1};
        case DType::Q4_0: return {32, 288, 0, -1, -1, -1, 32, -1};
        case DType::Q5_0: return {32, 352, 0, -1, -1, -1, 32, 288};
        case DType::Q4_K: return {256, 2368, 0, 32, 64, 192, 320, -1};
        case DType::Q6_K: return {256, 3360, 0, -1, 32, -1, 288, 2336};
        default: return {0, 0, 0, 0, 0, 0, 0, 0};
    }
}

}  // namespace llaisys::ops::panels
