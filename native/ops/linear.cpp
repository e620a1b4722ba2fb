// Matrix products against packed weights. Decode (one token) is bound by memory bandwidth, prefill
// by arithmetic; one tiled kernel serves both: a tile of tokens x panels keeps its accumulators in
// registers while it streams through the panels' k range once.
#include <array>
#include <bit>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {
namespace {

// Portable 16-lane vectors: GCC lowers them to one zmm, two ymm or four xmm registers.
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

// Tile shapes, sized so that accumulators and operands fit the vector register file.
#if defined(__AVX512F__)
constexpr int64_t kTileTokens = 8, kTilePanelsPrefill = 2, kTilePanelsDecode = 4;
#else
constexpr int64_t kTileTokens = 4, kTilePanelsPrefill = 1, kTilePanelsDecode = 2;
#endif
constexpr int kMaxTokens = 8, kMaxPanels = kGroup;
static_assert(kGroup % kTilePanelsDecode == 0 && kGroup % kTilePanelsPrefill == 0, "tiles must not straddle groups");
// Software prefetch distance, in k-pairs ahead of the tile's loads (measured: 8 to 64 do alike).
constexpr int64_t kPrefetchPairs = 32;

// tile[m][p*16 + lane] = sum over k-pairs [kp0, kp1) of x[m] . W[panel p, lane]; bf16 operands.
// Panel p's k-pair kp lies at w + kp * row_stride + p * 32.
template <int MT, int NP>
void tile_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t row_stride, int64_t kp0,
               int64_t kp1, float* tile) {
#if defined(__AVX512BF16__)
    __m512 acc[MT][NP];
    for (int m = 0; m < MT; ++m)
        for (int p = 0; p < NP; ++p) acc[m][p] = _mm512_setzero_ps();
    for (int64_t kp = kp0; kp < kp1; ++kp) {
        __m512bh wv[NP];
        for (int p = 0; p < NP; ++p) {
            __builtin_prefetch(w + (kp + kPrefetchPairs) * row_stride + p * 32);
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
#else
    // bf16 -> f32 is a 16-bit shift: the low half of each 32-bit pair is k, the high half k+1.
    f32x16 acc[MT][NP] = {};
    for (int64_t kp = kp0; kp < kp1; ++kp) {
        f32x16 w_lo[NP], w_hi[NP];
        for (int p = 0; p < NP; ++p) {
            u32x16 pairs;
            std::memcpy(&pairs, w + kp * row_stride + p * 32, sizeof pairs);
            w_lo[p] = (f32x16)(pairs << 16);
            w_hi[p] = (f32x16)(pairs & 0xffff0000u);
        }
        for (int m = 0; m < MT; ++m) {
            uint32_t pair;
            std::memcpy(&pair, x + m * ldx + 2 * kp, sizeof pair);
            float x_lo = std::bit_cast<float>(pair << 16), x_hi = std::bit_cast<float>(pair & 0xffff0000u);
            for (int p = 0; p < NP; ++p) {
                acc[m][p] += x_lo * w_lo[p];
                acc[m][p] += x_hi * w_hi[p];
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int p = 0; p < NP; ++p) std::memcpy(tile + (m * NP + p) * kPanel, &acc[m][p], sizeof(f32x16));
#endif
}

// The same over k in [k0, k1) with f32 operands; panel p's k lies at w + k * row_stride + p * 16.
template <int MT, int NP>
void tile_f32(const float* x, int64_t ldx, const float* w, int64_t row_stride, int64_t k0, int64_t k1,
              float* tile) {
    f32x16 acc[MT][NP] = {};
    for (int64_t k = k0; k < k1; ++k) {
        f32x16 wv[NP];
        for (int p = 0; p < NP; ++p) std::memcpy(&wv[p], w + k * row_stride + p * kPanel, sizeof(f32x16));
        for (int m = 0; m < MT; ++m) {
            float xv = x[m * ldx + k];
            for (int p = 0; p < NP; ++p) acc[m][p] += xv * wv[p];
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int p = 0; p < NP; ++p) std::memcpy(tile + (m * NP + p) * kPanel, &acc[m][p], sizeof(f32x16));
}

template <class T>
using TileFn = void (*)(const T*, int64_t, const T*, int64_t, int64_t, int64_t, float*);

template <class T, int I>
constexpr TileFn<T> tile_fn() {
    constexpr int MT = I / kMaxPanels + 1, NP = I % kMaxPanels + 1;
    if constexpr (std::is_same_v<T, uint16_t>) return &tile_bf16<MT, NP>;
    else return &tile_f32<MT, NP>;
}

template <class T, int... I>
constexpr std::array<TileFn<T>, sizeof...(I)> tile_table(std::integer_sequence<int, I...>) {
    return {tile_fn<T, I>()...};
}

// One instantiation per (tokens, panels) shape, so remainders run unrolled too.
template <class T>
void run_tile(int64_t mt, int64_t np, const T* x, int64_t ldx, const T* w, int64_t row_stride, int64_t k0,
              int64_t k1, float* tile) {
    static constexpr auto table = tile_table<T>(std::make_integer_sequence<int, kMaxTokens * kMaxPanels>{});
    table[(mt - 1) * kMaxPanels + (np - 1)](x, ldx, w, row_stride, k0, k1, tile);
}

// The left operand in the kernel's element type: bf16 rows padded to the panels' even k, or f32.
// (A per-thread buffer that only grows: fresh large allocations would fault pages on every call.)
template <class T>
const T* prepare_lhs(const Tensor& x, int64_t n_in_padded) {
    int64_t rows = n_rows(x), n_in = x.size(-1);
    thread_local std::vector<T> lhs;
    lhs.assign(rows * n_in_padded, T{0});
    std::vector<float> scratch;
    for (int64_t m = 0; m < rows; ++m) {
        const float* xr = row_f32(x, m, scratch);
        T* dst = lhs.data() + m * n_in_padded;
        if constexpr (std::is_same_v<T, uint16_t>) {
            for (int64_t k = 0; k < n_in; ++k) dst[k] = f32_to_bf16(xr[k]);
        } else {
            std::memcpy(dst, xr, n_in * sizeof(float));
        }
    }
    return lhs.data();
}

// Runs every tile of x W^T over k blocks of k_block columns and hands each to
// sink(m0, mt, p0, np, tile). Threads split the output panels, never k: each output element is
// computed by one thread in one fixed order, whatever the thread count.
template <class T, class Sink>
void for_each_tile(const Tensor& x, const PackedWeight& w, int64_t k_block, Sink sink) {
    constexpr int64_t k_unit = std::is_same_v<T, uint16_t> ? 2 : 1;  // bf16 panels step in k-pairs
    int64_t n_in_padded = w.panels.size(1) * k_unit;
    const T* lhs = prepare_lhs<T>(x, n_in_padded);
    constexpr int64_t unit = std::is_same_v<T, uint16_t> ? kPanel * 2 : kPanel;  // one panel's slice of a k step
    const int64_t M = n_rows(x), n_panels = (w.n_out + kPanel - 1) / kPanel, row_stride = kGroup * unit;
    const int64_t group = M == 1 ? kTilePanelsDecode : kTilePanelsPrefill;  // divides kGroup
    const int64_t n_tiles = (n_panels + group - 1) / group;
    const T* weights = w.panels.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < n_tiles; ++g) {
        int64_t p0 = g * group, np = std::min(group, n_panels - p0);
        const T* panel0 = weights + (p0 / kGroup) * w.panels.strides[0] + (p0 % kGroup) * unit;
        alignas(64) float tile[kMaxTokens * kMaxPanels * kPanel];
        for (int64_t m0 = 0; m0 < M; m0 += kTileTokens) {
            int64_t mt = std::min(kTileTokens, M - m0);
            for (int64_t k0 = 0; k0 < n_in_padded; k0 += k_block) {
                int64_t k1 = std::min(k0 + k_block, n_in_padded);
                run_tile<T>(mt, np, lhs + m0 * n_in_padded, n_in_padded, panel0, row_stride, k0 / k_unit, k1 / k_unit,
                            tile);
                sink(m0, mt, p0, np, tile);
            }
        }
    }
}

template <class Sink>
void dispatch_tiles(const Tensor& x, const PackedWeight& w, int64_t k_block, Sink sink) {
    LLAISYS_CHECK(x.size(-1) == w.n_in, "linear: x has the wrong number of columns");
    if (w.panels.dtype == DType::BF16) for_each_tile<uint16_t>(x, w, k_block, sink);
    else for_each_tile<float>(x, w, k_block, sink);
}

}  // namespace

PackedWeight pack_weight(const Tensor& w, DType dtype) {
    LLAISYS_CHECK(w.ndim() == 2 && w.strides[1] == 1, "pack_weight: w must be a matrix with contiguous rows");
    LLAISYS_CHECK(dtype == DType::BF16 || dtype == DType::F32, "pack_weight: packs to bf16 or f32");
    PackedWeight packed;
    packed.n_out = w.size(0);
    packed.n_in = w.size(1);
    int64_t n_panels = (packed.n_out + kPanel - 1) / kPanel, n_groups = (n_panels + kGroup - 1) / kGroup;
    if (dtype == DType::BF16) {
        int64_t k_pairs = (packed.n_in + 1) / 2;
        packed.panels = Tensor::zeros({n_groups, k_pairs, kGroup, kPanel, 2}, DType::BF16);
    } else {
        packed.panels = Tensor::zeros({n_groups, packed.n_in, kGroup, kPanel}, DType::F32);
    }
    prefer_huge_pages(packed.panels);
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < n_panels; ++p) {
        std::vector<float> row(packed.n_in);
        const int64_t group_offset = (p / kGroup) * packed.panels.strides[0];
        for (int64_t lane = 0; lane < kPanel && p * kPanel + lane < packed.n_out; ++lane) {
            int64_t r = p * kPanel + lane;
            if (dtype == DType::BF16) {
                // element (r, k) sits at [group][k / 2][p % kGroup][lane][k % 2]
                uint16_t* dst = packed.panels.data<uint16_t>() + group_offset + (p % kGroup) * kPanel * 2 + lane * 2;
                auto at = [&](int64_t k) -> uint16_t& { return dst[(k / 2) * kGroup * kPanel * 2 + k % 2]; };
                if (w.dtype == DType::BF16) {  // copy the bits: no double rounding
                    auto src = reinterpret_cast<const uint16_t*>(w.row(r));
                    for (int64_t k = 0; k < packed.n_in; ++k) at(k) = src[k];
                } else {
                    to_f32(row.data(), w.row(r), w.dtype, packed.n_in);
                    for (int64_t k = 0; k < packed.n_in; ++k) at(k) = f32_to_bf16(row[k]);
                }
            } else {
                // element (r, k) sits at [group][k][p % kGroup][lane]
                float* dst = packed.panels.data<float>() + group_offset + (p % kGroup) * kPanel + lane;
                to_f32(row.data(), w.row(r), w.dtype, packed.n_in);
                for (int64_t k = 0; k < packed.n_in; ++k) dst[k * kGroup * kPanel] = row[k];
            }
        }
    }
    return packed;
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
    int64_t k_all = w.panels.size(1) * (w.panels.dtype == DType::BF16 ? 2 : 1);
    dispatch_tiles(x, w, k_all, [&](int64_t m0, int64_t mt, int64_t p0, int64_t np, const float* tile) {
        for (int64_t m = 0; m < mt; ++m) {
            std::byte* dst = row_ptr(out, m0 + m);
            for (int64_t p = 0; p < np; ++p) {
                for (int64_t lane = 0; lane < kPanel; ++lane) {
                    int64_t col = (p0 + p) * kPanel + lane;
                    if (col >= w.n_out) break;
                    float v = tile[(m * np + p) * kPanel + lane] + (b.empty() ? 0.0f : b[col]);
                    if (out.dtype == DType::F32) reinterpret_cast<float*>(dst)[col] = v;
                    else from_f32(dst + col * dtype_size(out.dtype), out.dtype, &v, 1);
                }
            }
        }
    });
}

void linear_fixed(Tensor& out, const Tensor& x, const PackedWeight& w, int64_t k_block) {
    LLAISYS_CHECK(out.dtype == DType::I64, "linear_fixed: out must be i64");
    check_rows(out, w.n_out, "linear_fixed out");
    LLAISYS_CHECK(n_rows(out) == n_rows(x), "linear_fixed: out and x differ in rows");
    LLAISYS_CHECK(k_block > 0 && k_block % 2 == 0 && w.n_in % k_block == 0,
                  "linear_fixed: k_block must be even and divide n_in");
    // Clamp below 2^31 so that the scaled value fits an int64; truncation is deterministic.
    constexpr float kLimit = 2147483520.0f, kScale = static_cast<float>(kFixedOne);
    dispatch_tiles(x, w, k_block, [&](int64_t m0, int64_t mt, int64_t p0, int64_t np, const float* tile) {
        for (int64_t m = 0; m < mt; ++m) {
            int64_t* dst = reinterpret_cast<int64_t*>(row_ptr(out, m0 + m));
            for (int64_t p = 0; p < np; ++p) {
                int64_t col0 = (p0 + p) * kPanel, lanes = std::min(kPanel, w.n_out - col0);
                const float* t = tile + (m * np + p) * kPanel;
                for (int64_t lane = 0; lane < lanes; ++lane) {
                    float v = t[lane] > kLimit ? kLimit : (t[lane] < -kLimit ? -kLimit : t[lane]);
                    dst[col0 + lane] += static_cast<int64_t>(v * kScale);
                }
            }
        }
    });
}

void from_fixed(Tensor& out, const Tensor& in) {
    LLAISYS_CHECK(out.dtype == DType::F32 && in.dtype == DType::I64, "from_fixed: i64 in, f32 out");
    LLAISYS_CHECK(out.is_contiguous() && in.is_contiguous() && out.numel() == in.numel(), "from_fixed: shapes differ");
    const int64_t* src = in.data<int64_t>();
    float* dst = out.data<float>();
    for (int64_t i = 0; i < in.numel(); ++i) dst[i] = static_cast<float>(static_cast<double>(src[i]) / kFixedOne);
}

}  // namespace llaisys::ops
