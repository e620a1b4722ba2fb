// Matrix products against packed weights. Decode (one token) is bound by memory bandwidth, prefill
// by arithmetic; one tiled loop serves both: a tile of tokens x output rows keeps its accumulators in
// registers while it streams through the rows' k range once. Float panels use f32 (or bf16 pair)
// FMAs, or AMX bf16 tiles where the CPU has them; quantized panels use integer dot products
// (linear_quant.cpp).
#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <omp.h>
#include <type_traits>
#include <utility>

#include "../ops.hpp"
#include "../quant.hpp"
#include "amx.hpp"
#include "panels.hpp"
#include "rows.hpp"
#include "tiles.hpp"

namespace llaisys::ops {
namespace {

// Float tile shapes: tokens x panels, sized so that accumulators fit the vector registers.
#if defined(__AVX512BF16__)
constexpr int64_t kTileTokens = 8, kTilePanelsPrefill = 2, kTilePanelsDecode = 4;
#else
constexpr int64_t kTileTokens = 4, kTilePanelsPrefill = 1, kTilePanelsDecode = 4;
#endif
constexpr int kMaxTokens = 8, kMaxPanels = kGroup;
constexpr int64_t kMaxTileValues = std::max<int64_t>(kMaxTokens * kMaxPanels * kPanel, tiles::kPromptTileTokens * tiles::kPromptTileRows);
constexpr int64_t kMaxTileRows = tiles::kMaxTileGroups * tiles::kQuantTileHalves * tiles::kHalfRows;  // a quantized tile's
constexpr bool quantized_tiles_fit() {
    for (int mt = 1; mt <= tiles::kQuantTileTokens; ++mt)
        if (mt * tiles::max_tile_groups(mt) * tiles::kQuantTileHalves * tiles::kHalfRows > kMaxTileValues) return false;
    return true;
}
static_assert(quantized_tiles_fit(), "every quantized tile must fit the tile buffer");
constexpr int64_t kFewTokens = 16;  // up to this many tokens, quantized tiles span a whole group or more
// Tiles per thread below which linear_fixed also cuts k (fixed_k_parts), so that the threads can
// finish a product together by stealing.
constexpr int64_t kUnitsPerThread = 4;
static_assert(kGroup % kTilePanelsDecode == 0 && kGroup % kTilePanelsPrefill == 0, "tiles must not straddle groups");
// Software prefetch distance, in k steps ahead of the tile's loads (measured: 8 to 64 do alike).
constexpr int64_t kPrefetchSteps = 32;
// Columns of a few tokens' rows that one thread converts for the kernels (fill_lhs).
constexpr int64_t kLhsSpan = 512;

#if defined(__AVX512BF16__)
// bf16 lhs: x rounded to bf16, k-pairs side by side, as _mm512_dpbf16_ps consumes them.
using Bf16Lhs = uint16_t;

// tile[m][p*16 + lane] = sum over k-pairs [kp0, kp1) of x[m] . W[panel p, lane]; bf16 operands.
// Panel p's k-pair kp lies at w + kp * row_stride + p * 32.
template <int MT, int NP>
void tile_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t row_stride, int64_t kp0, int64_t kp1,
               float* tile) {
    __m512 acc[MT][NP];
    for (int m = 0; m < MT; ++m)
        for (int p = 0; p < NP; ++p) acc[m][p] = _mm512_setzero_ps();
    for (int64_t kp = kp0; kp < kp1; ++kp) {
        __m512bh wv[NP];
        for (int p = 0; p < NP; ++p) {
            __builtin_prefetch(w + (kp + kPrefetchSteps) * row_stride + p * 32);
            wv[p] = (__m512bh)_mm512_load_si512(w + kp * row_stride + p * 32);
        }
        for (int m = 0; m < MT; ++m) {
            int32_t pair;
            std::memcpy(&pair, x + m * ldx + 2 * kp, sizeof pair);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int p = 0; p < NP; ++p) acc[m][p] = _mm512_dpbf16_ps(acc[m][p], xv, wv[p]);
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int p = 0; p < NP; ++p) _mm512_storeu_ps(tile + (m * NP + p) * kPanel, acc[m][p]);
}

// bf16 weights on AMX tiles, where the CPU has AMX-BF16: one instruction multiplies 16 tokens by 16
// k-pairs of 16 rows. The packed panels are already the B layout (a k-pair's 16 rows x 2 values, 64
// bytes, k-pairs `row_stride` apart), and x's bf16 rows the A layout. Tile products round otherwise
// than vdpbf16ps, so a part takes this kernel for any number of tokens (decode too: it stays bound
// by memory), and each output still comes from one thread in one order: the same bits whatever the
// tokens, the batch or the rank count.
//
// Tile registers: the sums of (token half t, panel p) at 2t + p for up to 32 tokens x 2 panels, their
// activations in 4-5, the panels' k-pairs in 6-7; for up to 16 tokens x 4 panels (a whole group, as
// decode streams it), the sums at p, the activations in 4, the k-pairs in 5-7 in turn.
void tile_bf16_amx(const uint16_t* x, int64_t ldx, int mt, const uint16_t* w, int64_t row_stride, int np, int64_t kp0,
                   int64_t kp1, float* tile) {
    const int64_t x_bytes = ldx * 2, w_bytes = row_stride * 2, out_bytes = np * kPanel * 4;
    const int second = mt - 16;  // tokens in the second half, if any
    amx::Config config;
    if (second > 0) {
        for (int p = 0; p < 2; ++p) config.set(p, 16, 64), config.set(2 + p, second, 64);
        config.set(4, 16, 64), config.set(5, second, 64), config.set(6, 16, 64), config.set(7, 16, 64);
    } else {
        for (int p = 0; p < 4; ++p) config.set(p, mt, 64);
        config.set(4, mt, 64);
        for (int t = 5; t < 8; ++t) config.set(t, 16, 64);
    }
    amx::configure(config);
    LLAISYS_TILE_ZERO(0); LLAISYS_TILE_ZERO(1); LLAISYS_TILE_ZERO(2); LLAISYS_TILE_ZERO(3);
    for (int64_t kp = kp0; kp < kp1; kp += 16) {
        const uint16_t* xk = x + 2 * kp;
        const uint16_t* wk = w + kp * row_stride;
        // The panels' lines ahead, as the vector kernels ask for them (decode streams the weights).
        for (int64_t i = 0; i < 16; ++i)
            for (int p = 0; p < np; ++p) __builtin_prefetch(wk + (kPrefetchSteps + i) * row_stride + p * 32);
        if (second > 0) {
            LLAISYS_TILE_LOAD(4, xk, x_bytes);
            LLAISYS_TILE_LOAD(5, xk + 16 * ldx, x_bytes);
            LLAISYS_TILE_LOAD(6, wk, w_bytes);
            LLAISYS_TILE_DOT_BF16(0, 4, 6); LLAISYS_TILE_DOT_BF16(2, 5, 6);
            if (np > 1) {
                LLAISYS_TILE_LOAD(7, wk + 32, w_bytes);
                LLAISYS_TILE_DOT_BF16(1, 4, 7); LLAISYS_TILE_DOT_BF16(3, 5, 7);
            }
        } else {
            LLAISYS_TILE_LOAD(4, xk, x_bytes);
            LLAISYS_TILE_LOAD(5, wk, w_bytes);
            LLAISYS_TILE_DOT_BF16(0, 4, 5);
            if (np > 1) { LLAISYS_TILE_LOAD(6, wk + 32, w_bytes); LLAISYS_TILE_DOT_BF16(1, 4, 6); }
            if (np > 2) { LLAISYS_TILE_LOAD(7, wk + 64, w_bytes); LLAISYS_TILE_DOT_BF16(2, 4, 7); }
            if (np > 3) { LLAISYS_TILE_LOAD(5, wk + 96, w_bytes); LLAISYS_TILE_DOT_BF16(3, 4, 5); }
        }
    }
    float* second_rows = tile + 16 * np * kPanel;
    if (second > 0) {
        LLAISYS_TILE_STORE(0, tile, out_bytes); LLAISYS_TILE_STORE(2, second_rows, out_bytes);
        if (np > 1) { LLAISYS_TILE_STORE(1, tile + kPanel, out_bytes); LLAISYS_TILE_STORE(3, second_rows + kPanel, out_bytes); }
    } else {
        LLAISYS_TILE_STORE(0, tile, out_bytes);
        if (np > 1) LLAISYS_TILE_STORE(1, tile + kPanel, out_bytes);
        if (np > 2) LLAISYS_TILE_STORE(2, tile + 2 * kPanel, out_bytes);
        if (np > 3) LLAISYS_TILE_STORE(3, tile + 3 * kPanel, out_bytes);
    }
}
#else
// f32 lhs holding x rounded to bf16: the same products as the bf16 instructions compute.
using Bf16Lhs = float;

// As above with AVX2: bf16 -> f32 is a 16-bit shift; the low half of each 32-bit pair is k, the
// high half k+1. A panel's 16 rows are two 8-lane halves.
template <int MT, int NP>
void tile_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t row_stride, int64_t kp0, int64_t kp1,
               float* tile) {
    __m256 acc[MT][NP][2];
    for (int m = 0; m < MT; ++m)
        for (int p = 0; p < NP; ++p) acc[m][p][0] = acc[m][p][1] = _mm256_setzero_ps();
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    for (int64_t kp = kp0; kp < kp1; ++kp) {
        const uint16_t* wk = w + kp * row_stride;
        for (int p = 0; p < NP; ++p) {
            __builtin_prefetch(wk + kPrefetchSteps * row_stride + p * 32);
            for (int h = 0; h < 2; ++h) {
                const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(wk + p * 32 + h * 16));
                const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                const __m256 hi = _mm256_castsi256_ps(_mm256_and_si256(v, high));
                for (int m = 0; m < MT; ++m) {
                    acc[m][p][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + m * ldx + 2 * kp), lo, acc[m][p][h]);
                    acc[m][p][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + m * ldx + 2 * kp + 1), hi, acc[m][p][h]);
                }
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int p = 0; p < NP; ++p)
            for (int h = 0; h < 2; ++h) _mm256_storeu_ps(tile + (m * NP + p) * kPanel + h * 8, acc[m][p][h]);
}
#endif

// The same over k in [k0, k1) with f32 operands; panel p's k lies at w + k * row_stride + p * 16.
template <int MT, int NP>
void tile_f32(const float* x, int64_t ldx, const float* w, int64_t row_stride, int64_t k0, int64_t k1, float* tile) {
    __m256 acc[MT][NP][2];
    for (int m = 0; m < MT; ++m)
        for (int p = 0; p < NP; ++p) acc[m][p][0] = acc[m][p][1] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
        const float* wk = w + k * row_stride;
        for (int p = 0; p < NP; ++p) {
            __builtin_prefetch(wk + kPrefetchSteps * row_stride + p * kPanel);
            for (int h = 0; h < 2; ++h) {
                const __m256 wv = _mm256_load_ps(wk + p * kPanel + h * 8);
                for (int m = 0; m < MT; ++m)
                    acc[m][p][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + m * ldx + k), wv, acc[m][p][h]);
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int p = 0; p < NP; ++p)
            for (int h = 0; h < 2; ++h) _mm256_storeu_ps(tile + (m * NP + p) * kPanel + h * 8, acc[m][p][h]);
}

template <class X, class W>
using TileFn = void (*)(const X*, int64_t, const W*, int64_t, int64_t, int64_t, float*);

template <class X, class W, int I>
constexpr TileFn<X, W> tile_fn() {
    constexpr int MT = I / kMaxPanels + 1, NP = I % kMaxPanels + 1;
    if constexpr (std::is_same_v<W, uint16_t>) return &tile_bf16<MT, NP>;
    else return &tile_f32<MT, NP>;
}

template <class X, class W, int... I>
constexpr std::array<TileFn<X, W>, sizeof...(I)> tile_table(std::integer_sequence<int, I...>) {
    return {tile_fn<X, W, I>()...};
}

// One instantiation per (tokens, panels) shape, so remainders run unrolled too.
template <class X, class W>
void run_float_tile(int64_t mt, int64_t np, const X* x, int64_t ldx, const W* w, int64_t row_stride, int64_t k0,
                    int64_t k1, float* tile) {
    static constexpr auto table = tile_table<X, W>(std::make_integer_sequence<int, kMaxTokens * kMaxPanels>{});
    table[(mt - 1) * kMaxPanels + (np - 1)](x, ldx, w, row_stride, k0, k1, tile);
}

// x in the forms the parts' kernels consume, made once per call. (The calling thread's buffers,
// which only grow: fresh large allocations would fault pages on every call.)
struct Lhs {
    Bf16Lhs* bf16 = nullptr;  // rows of n_in rounded up to even
    float* f32 = nullptr;     // rows of n_in
    // Rows of n_in / 32 blocks; for AMX prompt tiles (interleaved) the 32 tokens of a tile side by
    // side per sub-block, so that a sub-block's activations for a tile are one run of memory: block
    // (m, sb) at ((m / 32) * ld_blocks + sb) * 32 + m % 32.
    quant::ActivationBlock* blocks = nullptr;
    bool need_bf16 = false, need_f32 = false, need_blocks = false, interleaved = false;
    int64_t ld_bf16 = 0, ld_f32 = 0, ld_blocks = 0;
    int64_t span = 0, spans_per_row = 0;  // fill_lhs's columns an item (at most), and items a row
};

// Whether a part of M tokens runs on AMX prompt tiles.
bool on_prompt_tiles(const PackedPart& part, int64_t M) {
    return is_quantized(part.dtype) && M > kFewTokens && tiles::amx_prompt_tiles();
}

// Whether a bf16 part runs on AMX tiles (tile_bf16_amx), for any number of tokens: where the CPU has
// AMX-BF16 and the k blocks are whole tile steps (32 k). Both conditions are the same on every rank.
bool on_bf16_tiles(const PackedPart& part, int64_t n_in, int64_t k_block) {
#if defined(__AVX512BF16__)
    return part.dtype == DType::BF16 && n_in % 32 == 0 && k_block % 32 == 0 && amx::support().bf16;
#else
    (void)part, (void)n_in, (void)k_block;
    return false;
#endif
}

// Sizes this thread's lhs buffers for x and decides which forms the parts need; fill_lhs() then
// writes them, its items spread over the threads that run the tiles.
Lhs prepare_lhs(const Tensor& x, const PackedWeight& w) {
    thread_local std::vector<Bf16Lhs> bf16;
    thread_local std::vector<float> f32;
    thread_local std::vector<quant::ActivationBlock> blocks;
    const int64_t rows = n_rows(x), n_in = w.n_in;
    Lhs lhs;
    for (const PackedPart& part : w.parts) {
        lhs.need_bf16 |= part.dtype == DType::BF16;
        lhs.need_f32 |= part.dtype == DType::F32;
        lhs.need_blocks |= is_quantized(part.dtype);
        lhs.interleaved |= on_prompt_tiles(part, rows);
    }
    lhs.ld_bf16 = (n_in + 1) / 2 * 2;
    lhs.ld_f32 = n_in;
    lhs.ld_blocks = n_in / 32;
    // The buffers only grow: resizing them to each product's size would zero the grown part again
    // at every call (a decode step's down_proj after its qkv_proj: 160 KB).
    const auto at_least = [](auto& buffer, int64_t n) {
        if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
    };
    if (lhs.need_bf16) {
        at_least(bf16, rows * lhs.ld_bf16);
        if (lhs.ld_bf16 != n_in)  // an odd n_in's pad column, which the k-pair kernels read
            for (int64_t m = 0; m < rows; ++m) bf16[m * lhs.ld_bf16 + n_in] = Bf16Lhs{0};
    }
    if (lhs.need_f32) at_least(f32, rows * n_in);
    // AMX prompt tiles read 32 tokens' blocks at a time: those past the last token are never used.
    if (lhs.need_blocks) at_least(blocks, (rows + tiles::kPromptTileTokens - 1) / tiles::kPromptTileTokens * tiles::kPromptTileTokens * lhs.ld_blocks);
    // A few tokens' rows are cut into column spans, so that every thread has a share (decode's
    // activations before down_proj are 4864 values: quantizing them on one thread kept the other
    // waiting). A span is whole 32-value blocks, and each value is converted alone, so the cut
    // changes no bits. Rows of another dtype than f32 are converted whole.
    lhs.span = rows >= kParallelRows || x.dtype != DType::F32 || n_in % 32 != 0 ? std::max<int64_t>(n_in, 1) : kLhsSpan;
    lhs.spans_per_row = (n_in + lhs.span - 1) / lhs.span;
    lhs.bf16 = bf16.data();
    lhs.f32 = f32.data();
    lhs.blocks = blocks.data();
    return lhs;
}

// Item `item` of fill_lhs's rows x spans: columns [c0, c1) of one row of x in every form lhs needs.
void fill_lhs(const Lhs& lhs, const Tensor& x, int64_t n_in, int64_t item, std::vector<float>& scratch) {
    const int64_t m = item / lhs.spans_per_row, c0 = item % lhs.spans_per_row * lhs.span;
    const int64_t c1 = std::min(n_in, c0 + lhs.span), n = c1 - c0;
    const float* xr = row_f32(x, m, scratch) + c0;
    if (lhs.need_bf16) {
        Bf16Lhs* dst = lhs.bf16 + m * lhs.ld_bf16 + c0;
        for (int64_t k = 0; k < n; ++k) {
            if constexpr (std::is_same_v<Bf16Lhs, uint16_t>) dst[k] = f32_to_bf16(xr[k]);
            else dst[k] = bf16_to_f32(f32_to_bf16(xr[k]));
        }
    }
    if (lhs.need_f32) std::memcpy(lhs.f32 + m * n_in + c0, xr, n * sizeof(float));
    if (lhs.need_blocks && lhs.interleaved) {
        constexpr int64_t T = tiles::kPromptTileTokens;
        quant::quantize_activations(xr, lhs.blocks + ((m / T) * lhs.ld_blocks + c0 / 32) * T + m % T, n, T);
    } else if (lhs.need_blocks) {
        quant::quantize_activations(xr, lhs.blocks + m * lhs.ld_blocks + c0 / 32, n);
    }
}

// Output rows of one unit of work: a whole number of 8-row halves for quantized parts, of 16-row
// panels for float ones. A few tokens (decode, batched decode) stream their quantized weights a
// group (64 rows) at a time; many tokens take one register of rows at a time (a half, or a panel with
// 512-bit VNNI), which their reuse keeps in L1, or with AMX the two panels of a prompt tile.
int64_t unit_rows(const PackedPart& part, int64_t M) {
    if (is_quantized(part.dtype)) {
        if (M <= kFewTokens) return tiles::kQuantTileHalves * tiles::kHalfRows;
        return on_prompt_tiles(part, M) ? tiles::kPromptTileRows : tiles::kRegisterRows;
    }
    return (M <= kFewTokens ? kTilePanelsDecode : kTilePanelsPrefill) * kPanel;
}

// How many consecutive row units one tile may take: one or two tokens read up to four or two groups
// side by side (2-core machine: Q4_0 decode +6-8% for two groups, +4-5% more for four; Q8_0 +3-5%
// for four).
int64_t units_per_tile(const PackedPart& part, int64_t M) {
    return is_quantized(part.dtype) && M <= kFewTokens ? tiles::max_tile_groups(static_cast<int>(M)) : 1;
}

// k in the units the part's kernel steps through: bf16 k-pairs, f32 k, quantized 32-value sub-blocks.
int64_t k_unit(DType dtype) { return dtype == DType::BF16 ? 2 : (is_quantized(dtype) ? 32 : 1); }

// Tokens of one unit of a thread's work: an AMX prompt tile's, else all (their tiles then reuse the
// rows' weights from cache). Splitting tokens too gives many threads enough units on small matrices
// (a layer's keys are 4 units of rows on AMX).
int64_t tile_tokens(const PackedPart& part, int64_t M, bool bf16_tiles) {
    return on_prompt_tiles(part, M) || (bf16_tiles && M > kFewTokens) ? tiles::kPromptTileTokens : M;
}

// One k block's products for a tile: values[m * ld + c] for tokens m0 + m (m < mt) and the part's
// output columns col0 + c (c < ncols). A tile's blocks come one after another, from one thread.
struct TileBlock {
    int64_t m0, mt, col0, ncols;
    const float* values;
    int64_t ld;
    bool first, last;  // the first and last k block of the tile's k part
    int64_t part;      // which of the tile's k parts (for_each_tile's k_parts)
};

// Columns [begin, end) of k that one unit of work covers: whole k blocks.
struct KRange {
    int64_t begin, end, part;
};

// Runs tile (part, first row r0, rows_per_tile rows or the part's last ones) for tokens [m_begin, m_end)
// of M over the k blocks (of k_block columns) of kr, and hands each block's result to sink(const TileBlock&).
template <class Sink>
void run_tile(const Lhs& lhs, const PackedWeight& w, const PackedPart& part, int64_t r0, int64_t M, int64_t m_begin,
              int64_t m_end, int64_t k_block, int64_t rows_per_tile, KRange kr, Sink& sink) {
    alignas(64) float tile[kMaxTileValues];
    const int64_t rows = std::min(rows_per_tile, part.n_out - r0);
    const int64_t unit = k_unit(part.dtype);
    kr.end = std::min(kr.end, part.dtype == DType::BF16 ? lhs.ld_bf16 : w.n_in);  // the last block may be short
    if (is_quantized(part.dtype)) {
        const int64_t n_blocks = w.n_in / block_elements(part.dtype);
        const int64_t chunk = panels::layout(part.dtype).chunk;
        const std::byte* group = part.panels.base + (r0 / (kGroup * kPanel)) * n_blocks * kGroup * chunk;
        const int h0 = static_cast<int>((r0 % (kGroup * kPanel)) / tiles::kHalfRows);
        const int nh = static_cast<int>((rows + tiles::kHalfRows - 1) / tiles::kHalfRows);
        if (on_prompt_tiles(part, M)) {  // 32 tokens x two panels
            for (int64_t m0 = m_begin; m0 < m_end; m0 += tiles::kPromptTileTokens) {
                const int64_t mt = std::min<int64_t>(tiles::kPromptTileTokens, m_end - m0);
                for (int64_t k0 = kr.begin; k0 < kr.end; k0 += k_block) {
                    const int64_t k1 = std::min(k0 + k_block, kr.end);
                    tiles::quant_prompt_tile(part.dtype, lhs.blocks + m0 * lhs.ld_blocks, group,
                                             h0 * tiles::kHalfRows / kPanel, k0 / unit, k1 / unit, tile);
                    sink(TileBlock{m0, mt, part.row_begin + r0, rows, tile, tiles::kPromptTileRows, k0 == kr.begin, k1 == kr.end, kr.part});
                }
            }
            return;
        }
        for (int64_t m0 = m_begin; m0 < m_end; m0 += tiles::kQuantTileTokens) {
            const int mt = static_cast<int>(std::min<int64_t>(tiles::kQuantTileTokens, m_end - m0));
            for (int64_t k0 = kr.begin; k0 < kr.end; k0 += k_block) {
                const int64_t k1 = std::min(k0 + k_block, kr.end);
                tiles::quant_tile(part.dtype, mt, nh, lhs.blocks + m0 * lhs.ld_blocks, lhs.ld_blocks, group, n_blocks, h0,
                                  k0 / unit, k1 / unit, tile);
                sink(TileBlock{m0, mt, part.row_begin + r0, rows, tile, nh * tiles::kHalfRows, k0 == kr.begin, k1 == kr.end, kr.part});
            }
        }
        return;
    }
    const int64_t p0 = r0 / kPanel, np = (rows + kPanel - 1) / kPanel;
    const int64_t step = part.dtype == DType::BF16 ? kPanel * 2 : kPanel;  // one panel's slice of a k step
    const int64_t row_stride = kGroup * step;
#if defined(__AVX512BF16__)
    if (on_bf16_tiles(part, w.n_in, k_block)) {
        const uint16_t* panel0 = part.panels.data<uint16_t>() + (p0 / kGroup) * part.panels.strides[0] + (p0 % kGroup) * step;
        for (int64_t m0 = m_begin; m0 < m_end; m0 += tiles::kPromptTileTokens) {
            const int mt = static_cast<int>(std::min<int64_t>(tiles::kPromptTileTokens, m_end - m0));
            for (int64_t k0 = kr.begin; k0 < kr.end; k0 += k_block) {
                const int64_t k1 = std::min(k0 + k_block, kr.end);
                tile_bf16_amx(lhs.bf16 + m0 * lhs.ld_bf16, lhs.ld_bf16, mt, panel0, row_stride, static_cast<int>(np),
                              k0 / unit, k1 / unit, tile);
                sink(TileBlock{m0, mt, part.row_begin + r0, rows, tile, np * kPanel, k0 == kr.begin, k1 == kr.end, kr.part});
            }
        }
        return;
    }
#endif
    for (int64_t m0 = m_begin; m0 < m_end; m0 += kTileTokens) {
        const int64_t mt = std::min(kTileTokens, m_end - m0);
        for (int64_t k0 = kr.begin; k0 < kr.end; k0 += k_block) {
            const int64_t k1 = std::min(k0 + k_block, kr.end);
            if (part.dtype == DType::BF16) {
                const uint16_t* panel0 = part.panels.data<uint16_t>() + (p0 / kGroup) * part.panels.strides[0] + (p0 % kGroup) * step;
                run_float_tile<Bf16Lhs, uint16_t>(mt, np, lhs.bf16 + m0 * lhs.ld_bf16, lhs.ld_bf16, panel0, row_stride,
                                                  k0 / unit, k1 / unit, tile);
            } else {
                const float* panel0 = part.panels.data<float>() + (p0 / kGroup) * part.panels.strides[0] + (p0 % kGroup) * step;
                run_float_tile<float, float>(mt, np, lhs.f32 + m0 * lhs.ld_f32, lhs.ld_f32, panel0, row_stride, k0, k1, tile);
            }
            sink(TileBlock{m0, mt, part.row_begin + r0, rows, tile, np * kPanel, k0 == kr.begin, k1 == kr.end, kr.part});
        }
    }
}

// How a part's work is cut: row units x token units, repeated for each of k_parts runs of k.
struct PartUnits {
    int64_t first;        // the part's first unit in the product's numbering
    int64_t rows;         // output rows a unit
    int64_t per_tile;     // consecutive row units one tile may take (more than one only where all tokens are one unit)
    int64_t tokens;       // tokens a token unit
    int64_t token_units;  // token units a row unit
    int64_t segment;      // units of one k part: row units x token units
};

PartUnits part_units(const PackedPart& part, int64_t M, int64_t n_in, int64_t k_block, int64_t first) {
    const int64_t rows = unit_rows(part, M), tokens = tile_tokens(part, M, on_bf16_tiles(part, n_in, k_block));
    const int64_t token_units = (M + tokens - 1) / tokens;
    return {first, rows, units_per_tile(part, M), tokens, token_units, (part.n_out + rows - 1) / rows * token_units};
}

// Tiles of full width that a product's parts make (k uncut).
int64_t whole_tiles(const PackedWeight& w, int64_t M, int64_t k_block) {
    int64_t tiles = 0;
    for (const PackedPart& part : w.parts) {
        const PartUnits u = part_units(part, M, w.n_in, k_block, 0);
        tiles += (u.segment + u.per_tile - 1) / u.per_tile;
    }
    return tiles;
}

// Every tile of x W^T over k blocks of k_block columns, each handed to the sink. Threads split
// the tiles (output rows, and tokens); each output element is computed by one thread in one fixed
// order, whatever the thread count or the tiles' widths. With k_parts > 1 each row unit's k range is
// also cut into that many runs of whole k blocks, units of work of their own: only for sinks whose
// result does not depend on how k is cut (linear_fixed's integer sums). TileBlock::part says which
// run a block belongs to.
//
// Each thread first works through its own contiguous run of units from the front, in tiles as wide
// as the kernels take (as a static schedule would: its stream of weights stays sequential), then
// helps the others by taking units from the back of their runs, at most half of what is left: with
// a static split alone one of two decode threads waited 5-10% of each product for the other (the
// memory does not serve both alike), and interleaving single tiles (a dynamic schedule) read 10%
// slower. Taking from the back lets the last steals be single units while the owner keeps its wide
// tiles: taking whole tiles from the front left threads waiting up to a tile at the end.
template <class Sink>
void for_each_tile(const Tensor& x, const PackedWeight& w, int64_t k_block, int64_t k_parts, Sink sink) {
    LLAISYS_CHECK(x.size(-1) == w.n_in, "linear: x has the wrong number of columns");
    const Lhs lhs = prepare_lhs(x, w);
    const int64_t M = n_rows(x);
    const int64_t k_blocks = (w.n_in + k_block - 1) / k_block;
    const int runs = omp_get_max_threads();
    std::vector<PartUnits> split;
    int64_t units = 0;
    for (const PackedPart& part : w.parts) {
        split.push_back(part_units(part, M, w.n_in, k_block, units));
        units += split.back().segment * k_parts;
    }
    LLAISYS_CHECK(units < (int64_t{1} << 32), "linear: too many units of work");
    const auto part_of = [&](int64_t unit) {
        size_t i = 0;
        while (i + 1 < split.size() && split[i + 1].first <= unit) ++i;
        return i;
    };
    // Units [u, u + n) of one part and k part, as one tile.
    const auto run_units = [&](int64_t u, int64_t n) {
        const size_t i = part_of(u);
        const PartUnits& p = split[i];
        const int64_t local = u - p.first, k_part = local / p.segment, within = local % p.segment;
        const int64_t row_unit = within / p.token_units, m_begin = within % p.token_units * p.tokens;
        const KRange kr{k_blocks * k_part / k_parts * k_block, k_blocks * (k_part + 1) / k_parts * k_block, k_part};
        run_tile(lhs, w, w.parts[i], row_unit * p.rows, M, m_begin, std::min(M, m_begin + p.tokens), k_block, n * p.rows, kr, sink);
    };
    // How many units a tile takes from the front of [next, end), or from its back.
    const auto front = [&](int64_t next, int64_t end) {
        const PartUnits& p = split[part_of(next)];
        return std::min({p.per_tile, end - next, p.segment - (next - p.first) % p.segment});
    };
    const auto back = [&](int64_t next, int64_t end) {
        const PartUnits& p = split[part_of(end - 1)];
        return std::min({p.per_tile, (end - next + 1) / 2, (end - 1 - p.first) % p.segment + 1});
    };
    struct alignas(64) Run {  // a thread's run of units: the next one not taken (low half) and its end (high half)
        std::atomic<uint64_t> range;
    };
    const auto pack = [](int64_t next, int64_t end) { return static_cast<uint64_t>(end) << 32 | static_cast<uint64_t>(next); };
    std::vector<Run> run_of(runs);
    for (int r = 0; r < runs; ++r) run_of[r].range = pack(units * r / runs, units * (r + 1) / runs);
#pragma omp parallel num_threads(runs)
    {
        std::vector<float> scratch;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < M * lhs.spans_per_row; ++item) fill_lhs(lhs, x, w.n_in, item, scratch);
        // (the loop's closing barrier: every thread's tiles read all of the lhs)
        // A team smaller than asked for still runs every run: each thread visits all of them.
        const int me = omp_get_thread_num();
        for (int v = 0; v < runs; ++v) {
            std::atomic<uint64_t>& range = run_of[(me + v) % runs].range;
            uint64_t seen = range.load(std::memory_order_relaxed);
            for (;;) {
                const int64_t next = seen & 0xffffffffu, end = seen >> 32;
                if (next >= end) break;
                const int64_t n = v == 0 ? front(next, end) : back(next, end);
                const int64_t u = v == 0 ? next : end - n;
                if (!range.compare_exchange_weak(seen, v == 0 ? pack(next + n, end) : pack(next, end - n), std::memory_order_relaxed))
                    continue;  // another thread took units first: `seen` now holds the run as it is
                run_units(u, n);
                seen = range.load(std::memory_order_relaxed);
            }
        }
    }
}

}  // namespace

std::string amx_tiles() {
    const bool int8 = tiles::amx_prompt_tiles();
#if defined(__AVX512BF16__)
    const bool bf16 = amx::support().bf16;
#else
    const bool bf16 = false;
#endif
    return int8 && bf16 ? "int8+bf16" : int8 ? "int8" : bf16 ? "bf16" : "none";
}

void linear(Tensor& out, const Tensor& x, const PackedWeight& w, const Tensor* bias) {
    check_rows(out, w.n_out, "linear out");
    LLAISYS_CHECK(n_rows(out) == n_rows(x), "linear: out and x differ in rows");
    std::vector<float> b;  // f32 copy of the bias; empty when there is none
    if (bias) {
        LLAISYS_CHECK(bias->ndim() == 1 && bias->size(0) == w.n_out && bias->is_contiguous(), "linear: bias must be [n_out]");
        b.resize(w.n_out);
        to_f32(b.data(), bias->base, bias->dtype, w.n_out);
    }
    const int64_t k_all = (w.n_in + 1) / 2 * 2;  // every part's whole k range in one block
    const float* bias_f32 = b.empty() ? nullptr : b.data();
    for_each_tile(x, w, k_all, 1, [&](const TileBlock& b) {
        float row[kMaxTileRows];  // one token's columns of the tile, biased
        for (int64_t m = 0; m < b.mt; ++m) {
            for (int64_t c = 0; c < b.ncols; ++c) row[c] = b.values[m * b.ld + c] + (bias_f32 ? bias_f32[b.col0 + c] : 0.0f);
            from_f32(row_ptr(out, b.m0 + m) + b.col0 * block_bytes(out.dtype), out.dtype, row, b.ncols);
        }
    });
}

namespace {

// dst[c] += v[c] in units of 2^-32, rounded to nearest (even on ties), for c < n. With AVX-512,
// sixteen at a time below 2^30 (|v| * 2^32 is then exact in f32 and fits an int64 conversion); else
// four at a time through doubles below 2^19 (adding 2^52 + 2^51 leaves the rounded integer in the
// low mantissa bits, exactly); larger values (and the tail) take the scalar path, clamped so they fit
// an int64. All three round alike. NaNs take the scalar path.
void add_fixed(int64_t* dst, const float* v, int64_t n) {
    int64_t c = 0;
#if defined(__AVX512DQ__)
    const __m512 scale16 = _mm512_set1_ps(static_cast<float>(kFixedOne)), small = _mm512_set1_ps(1073741824.0f);
    for (; c + 16 <= n; c += 16) {
        const __m512 x = _mm512_loadu_ps(v + c);
        if (_mm512_cmp_ps_mask(_mm512_abs_ps(x), small, _CMP_NLT_UQ)) break;
        const __m512 units = _mm512_mul_ps(x, scale16);
        const __m512i lo = _mm512_cvt_roundps_epi64(_mm512_castps512_ps256(units), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i hi = _mm512_cvt_roundps_epi64(_mm512_extractf32x8_ps(units, 1), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm512_storeu_si512(dst + c, _mm512_add_epi64(_mm512_loadu_si512(dst + c), lo));
        _mm512_storeu_si512(dst + c + 8, _mm512_add_epi64(_mm512_loadu_si512(dst + c + 8), hi));
    }
#endif
    const __m256d scale = _mm256_set1_pd(kFixedOne), magic = _mm256_set1_pd(6755399441055744.0);
    const __m256d limit = _mm256_set1_pd(2251799813685248.0), sign = _mm256_set1_pd(-0.0);
    for (; c + 4 <= n; c += 4) {
        const __m256d d = _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(v + c)), scale);
        if (_mm256_movemask_pd(_mm256_cmp_pd(_mm256_andnot_pd(sign, d), limit, _CMP_GE_OQ))) break;
        const __m256i rounded = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(d, magic)), _mm256_castpd_si256(magic));
        __m256i* at = reinterpret_cast<__m256i*>(dst + c);
        _mm256_storeu_si256(at, _mm256_add_epi64(_mm256_loadu_si256(at), rounded));
    }
    constexpr double kLimit = 9.2e18;  // below 2^63
    for (; c < n; ++c) {
        const double d = static_cast<double>(v[c]) * kFixedOne;
        dst[c] += static_cast<int64_t>(std::nearbyint(d > kLimit ? kLimit : (d < -kLimit ? -kLimit : d)));
    }
}

// How many runs of k blocks linear_fixed cuts each row unit into: one, unless a few tokens' tiles are
// too few for the threads (a decode step's down_proj in the 0.5B model is 14 groups, 4 tiles: a
// group of 4864 k is 175 KB of Q4_0, too coarse a unit to share at the end), and only into runs of
// kMinRunBlocks blocks or more. Runs of one or two blocks (a rank's o_proj and down_proj at 4 x 4 or
// 8 x 2 on 16 cores) cost more in calls and in the runs' sums than they gained: cutting them no more
// decoded 1.05-1.17x (16 cores: 4 x 4, 8 x 2, 2 x 8).
// Integer sums make any cut give the same bits.
constexpr int64_t kMinRunBlocks = 8;
int64_t fixed_k_parts(const Tensor& x, const PackedWeight& w, int64_t k_block) {
    const int64_t M = n_rows(x);
    if (M > kFewTokens) return 1;
    const int64_t tiles = whole_tiles(w, M, k_block);
    const int64_t wanted = (kUnitsPerThread * omp_get_max_threads() + tiles - 1) / std::max<int64_t>(tiles, 1);
    return std::clamp<int64_t>(wanted, 1, std::max<int64_t>(w.n_in / k_block / kMinRunBlocks, 1));
}

}  // namespace

void linear_fixed(Tensor& out, const Tensor& x, const PackedWeight& w, int64_t k_block) {
    LLAISYS_CHECK(out.dtype == DType::I64, "linear_fixed: out must be i64");
    check_rows(out, w.n_out, "linear_fixed out");
    LLAISYS_CHECK(n_rows(out) == n_rows(x), "linear_fixed: out and x differ in rows");
    for (const PackedPart& part : w.parts)
        LLAISYS_CHECK(k_block > 0 && k_block % k_unit(part.dtype) == 0 && w.n_in % k_block == 0,
                      "linear_fixed: k_block must divide n_in in whole steps of every part's kernel");
    const int64_t M = n_rows(x), n_out = w.n_out, parts = fixed_k_parts(x, w, k_block);
    // Cut in k, each part's sums go to a buffer of their own (each element written by one thread),
    // added to out at the end. (A pointer: the lambda runs on other threads, which have their own
    // thread_local vector.)
    thread_local std::vector<int64_t> part_buffer;
    if (parts > 1) part_buffer.assign(parts * M * n_out, 0);
    int64_t* const part_sums = part_buffer.data();
    for_each_tile(x, w, k_block, parts, [&](const TileBlock& b) {
        // The tile's sums stay in this thread's buffer, in cache, over its k blocks, and go out once.
        alignas(64) thread_local int64_t sums[kMaxTileValues];
        const int64_t n = b.mt * b.ld;  // columns past ncols hold the panels' zero padding
        if (b.first) std::fill(sums, sums + n, int64_t{0});
        add_fixed(sums, b.values, n);
        if (!b.last) return;
        for (int64_t m = 0; m < b.mt; ++m) {
            int64_t* dst = parts > 1 ? part_sums + (b.part * M + b.m0 + m) * n_out + b.col0
                                     : reinterpret_cast<int64_t*>(row_ptr(out, b.m0 + m)) + b.col0;
            for (int64_t c = 0; c < b.ncols; ++c) dst[c] += sums[m * b.ld + c];
        }
    });
    if (parts == 1) return;
    for (int64_t p = 0; p < parts; ++p)
        for (int64_t m = 0; m < M; ++m) {
            int64_t* dst = reinterpret_cast<int64_t*>(row_ptr(out, m));
            const int64_t* src = part_sums + (p * M + m) * n_out;
            for (int64_t c = 0; c < n_out; ++c) dst[c] += src[c];
        }
}

void add_from_fixed(Tensor& x, const Tensor& in) {
    LLAISYS_CHECK(x.dtype == DType::F32 && in.dtype == DType::I64, "add_from_fixed: f32 x, i64 in");
    LLAISYS_CHECK(x.is_contiguous() && in.is_contiguous() && x.numel() == in.numel(), "add_from_fixed: shapes differ");
    const int64_t* src = in.data<int64_t>();
    float* dst = x.data<float>();
    const int64_t n = in.numel();
#pragma omp parallel for schedule(static) if (n >= kParallelRows * 1024)
    for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<float>(static_cast<double>(src[i]) / kFixedOne);
}

}  // namespace llaisys::ops
