// The quantized matrix kernel's inner tile (linear_quant.cpp), called by linear.cpp: a block of
// x W^T for a few tokens and 8-row halves of one group of panels, over a range of k.
#pragma once

#include <cstdint>

#include "../quant.hpp"

namespace llaisys::ops::tiles {

constexpr int kHalfRows = 8;        // rows a tile column unit holds: one 256-bit register of results
// Rows one register of results holds in the kernel: a whole 16-row panel where the CPU has 512-bit
// VNNI (a prompt's tiles take one such register of rows at a time), else a half.
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LLAISYS_ZMM_TILES 1
constexpr int kRegisterRows = 16;
#else
constexpr int kRegisterRows = 8;
#endif
constexpr int kQuantTileTokens = 4;  // a tile holds up to 4 tokens
constexpr int kQuantTileHalves = 8;  // x up to a whole group (4 panels x 2 halves)

// tile[m * nh * 8 + h * 8 + r] = sum over sub-blocks [sb0, sb1) (32 values each) of x[m] . W[row]
// for tokens m < mt and rows r of halves h0 .. h0 + nh of the group starting at `group` (which holds
// n_blocks blocks of `type` per panel). x[m] is at x + m * ldx, in blocks of 32.
void quant_tile(DType type, int mt, int nh, const quant::ActivationBlock* x, int64_t ldx, const std::byte* group,
                int64_t n_blocks, int h0, int64_t sb0, int64_t sb1, float* tile);

}  // namespace llaisys::ops::tiles
