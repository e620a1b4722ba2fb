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
// A tile of one token may span up to four groups (4 x kQuantTileHalves halves), of two tokens two,
// which it reads side by side: a thread reading its weights as 4 streams read 13% faster than as 2,
// and 2 faster than 1 (probes on the 2-core machine, two threads).
// (With 256-bit registers only, 16 of them, one token reads two groups: four groups' accumulators
// would not fit.)
#ifdef LLAISYS_ZMM_TILES
constexpr int kMaxTileGroups = 4;
#else
constexpr int kMaxTileGroups = 2;
#endif
constexpr int max_tile_groups(int mt) { return mt == 1 ? kMaxTileGroups : mt == 2 ? 2 : 1; }

// tile[m * nh * 8 + h * 8 + r] = sum over sub-blocks [sb0, sb1) (32 values each) of x[m] . W[row]
// for tokens m < mt and rows r of halves h0 .. h0 + nh of the group starting at `group` (which holds
// n_blocks blocks of `type` per panel; halves past its 8 are the next groups', and a tile of more
// than one group starts at h0 = 0). x[m] is at x + m * ldx, in blocks of 32.
void quant_tile(DType type, int mt, int nh, const quant::ActivationBlock* x, int64_t ldx, const std::byte* group,
                int64_t n_blocks, int h0, int64_t sb0, int64_t sb1, float* tile);

// Prompts on AMX, where the CPU has it (and 512-bit VNNI): tile[m * 32 + r] as above for 32 tokens
// and the 32 rows of panels panel0 and panel0 + 1 of the group (panel0 = 0 or 2), from AMX int8 tile
// products. The same integer sums and float steps as quant_tile, so the same bits. The tokens' blocks
// are interleaved: token m's sub-block sb at x[sb * 32 + m] (results for tokens past the caller's are
// to be ignored).
constexpr int kPromptTileTokens = 32, kPromptTileRows = 32;
bool amx_prompt_tiles();
void quant_prompt_tile(DType type, const quant::ActivationBlock* x, const std::byte* group, int panel0, int64_t sb0,
                       int64_t sb1, float* tile);

}  // namespace llaisys::ops::tiles
