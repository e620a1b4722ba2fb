// Integer dot products of quantized weights (panels.hpp) against activations quantized per 32.
//
// Weights hold unsigned integers (Q4: 0-15, Q5: 0-31, Q6: 0-63) or signed ones (Q8), 8 rows to a
// 256-bit register, 4 consecutive k per row; an activation quad is broadcast to all rows. Unsigned
// values multiply signed activations directly (u8 x s8 products), and the format's offset comes out
// through the activation block's sum: sum((q - o) x) = sum(q x) - o sum(x). Signed Q8 values use
// the sign trick (|w| times x with w's sign). The products are summed by VNNI's dpbusd where the CPU
// has it, else by AVX2's maddubs (ByteDots). Each sub-block's integer sum turns into f32 with the
// row scales. Integer sums are exact either way, so both give bit-identical results.
#include <array>
#include <cstring>
#include <utility>
#include <immintrin.h>

#include "panels.hpp"
#include "tiles.hpp"

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "llaisys-chat's kernels need AVX2, FMA and F16C (build with -march=native or LLAISYS_PORTABLE=1)"
#endif

namespace llaisys::ops::tiles {
namespace {

using quant::ActivationBlock;

inline __m256i load32(const std::byte* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256 load_f16x8(const std::byte* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256i load_u8x8(const std::byte* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline __m256i load_i8x8(const std::byte* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }

// Activation quad `step` (4 int8) of a block, in every 32-bit lane.
inline __m256i quad(const ActivationBlock* a, int step) {
    int32_t v;
    std::memcpy(&v, a->q + 4 * step, sizeof v);
    return _mm256_set1_epi32(v);
}

inline __m256i widen(__m256i pairs16) { return _mm256_madd_epi16(pairs16, _mm256_set1_epi16(1)); }

// Sums of u8 x s8 products, 4 to each 32-bit lane. With VNNI each add() is one dpbusd into 32 bits.
// Without, maddubs' 16-bit pair sums gather in 16 bits until flush() widens them: the caller flushes
// before they could overflow (the bound depends on the format's value range), and no pair sum
// saturates (|w| <= 128 and |x| <= 127 give at most 32512).
struct ByteDots {
    __m256i sum = _mm256_setzero_si256();  // 32-bit lanes, complete after flush()
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    void add(__m256i u8, __m256i s8) { sum = _mm256_dpbusd_epi32(sum, u8, s8); }
    void flush() {}
#elif defined(__AVXVNNI__)
    void add(__m256i u8, __m256i s8) { sum = _mm256_dpbusd_avx_epi32(sum, u8, s8); }
    void flush() {}
#else
    __m256i pairs = _mm256_setzero_si256();
    void add(__m256i u8, __m256i s8) { pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(u8, s8)); }
    void flush() {
        sum = _mm256_add_epi32(sum, widen(pairs));
        pairs = _mm256_setzero_si256();
    }
#endif
};

inline __m256i low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline __m256i high_nibbles(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }

// Integer sums of one sub-block (8 steps) of one half, for MT tokens. `values` points at the
// sub-block's first step (Q8) or pair (others) of this half.
template <int MT>
[[gnu::always_inline]] inline void dot_q8(const std::byte* values, const ActivationBlock* const* x, __m256i* out) {
    ByteDots dots[MT];
    for (int s = 0; s < 8; ++s) {
        const __m256i w = load32(values + s * 64), magnitude = _mm256_sign_epi8(w, w);
        for (int m = 0; m < MT; ++m) {
            dots[m].add(magnitude, _mm256_sign_epi8(quad(x[m], s), w));
            dots[m].flush();  // two pair sums could overflow 16 bits
        }
    }
    for (int m = 0; m < MT; ++m) out[m] = dots[m].sum;
}

// 4-bit values: 8 steps of pair sums (at most 8 * 2 * 15 * 127) fit 16 bits.
template <int MT>
[[gnu::always_inline]] inline void dot_q4(const std::byte* pairs, const ActivationBlock* const* x, __m256i* out) {
    ByteDots dots[MT];
    for (int j = 0; j < 4; ++j) {
        const __m256i v = load32(pairs + j * 64), lo = low_nibbles(v), hi = high_nibbles(v);
        for (int m = 0; m < MT; ++m) {
            dots[m].add(lo, quad(x[m], 2 * j));
            dots[m].add(hi, quad(x[m], 2 * j + 1));
        }
    }
    for (int m = 0; m < MT; ++m) {
        dots[m].flush();
        out[m] = dots[m].sum;
    }
}

// Bit 4 of step s's values: bit s of the plane's bytes, moved to bit 4 (16-bit shifts: what crosses
// into the other byte of a pair never reaches bit 4).
inline __m256i plane_bit(__m256i plane, int s) {
    const __m256i shifted = s <= 4 ? _mm256_slli_epi16(plane, 4 - s) : _mm256_srli_epi16(plane, s - 4);
    return _mm256_and_si256(shifted, _mm256_set1_epi8(0x10));
}

// 5-bit values: the high bit of step s is bit s of the plane's byte; 4 steps fit 16 bits.
template <int MT>
[[gnu::always_inline]] inline void dot_q5(const std::byte* pairs, const std::byte* plane, const ActivationBlock* const* x, __m256i* out) {
    const __m256i bits = load32(plane);
    ByteDots dots[MT];
    for (int j = 0; j < 4; ++j) {
        const __m256i v = load32(pairs + j * 64);
        const __m256i lo = _mm256_or_si256(low_nibbles(v), plane_bit(bits, 2 * j));
        const __m256i hi = _mm256_or_si256(high_nibbles(v), plane_bit(bits, 2 * j + 1));
        for (int m = 0; m < MT; ++m) {
            dots[m].add(lo, quad(x[m], 2 * j));
            dots[m].add(hi, quad(x[m], 2 * j + 1));
            if (j % 2 == 1) dots[m].flush();
        }
    }
    for (int m = 0; m < MT; ++m) out[m] = dots[m].sum;
}

// The top 2 bits of step s' (0-3) of a Q6_K plane, at bits 4-5 of each byte.
inline __m256i plane_bits(__m256i plane, int s) {
    const __m256i mask = _mm256_set1_epi8(0x30);
    switch (s) {
        case 0: return _mm256_and_si256(_mm256_slli_epi16(plane, 4), mask);
        case 1: return _mm256_and_si256(_mm256_slli_epi16(plane, 2), mask);
        case 2: return _mm256_and_si256(plane, mask);
        default: return _mm256_and_si256(_mm256_srli_epi16(plane, 2), mask);
    }
}

// 6-bit values in two groups of 16 (4 steps) with int8 scales: sum over groups of
// scale * (sum(q x) - 32 sum(x)); 2 steps of pair sums fit 16 bits.
template <int MT>
[[gnu::always_inline]] inline void dot_q6(const std::byte* pairs, const std::byte* planes, const std::byte* scales, const ActivationBlock* const* x,
            __m256i* out) {
    for (int m = 0; m < MT; ++m) out[m] = _mm256_setzero_si256();
    for (int g = 0; g < 2; ++g) {
        const __m256i plane = load32(planes + g * 64);
        ByteDots dots[MT];
        for (int j = 2 * g; j < 2 * g + 2; ++j) {
            const __m256i v = load32(pairs + j * 64);
            const __m256i lo = _mm256_or_si256(low_nibbles(v), plane_bits(plane, 2 * (j - 2 * g)));
            const __m256i hi = _mm256_or_si256(high_nibbles(v), plane_bits(plane, 2 * (j - 2 * g) + 1));
            for (int m = 0; m < MT; ++m) {
                dots[m].add(lo, quad(x[m], 2 * j));
                dots[m].add(hi, quad(x[m], 2 * j + 1));
                dots[m].flush();
            }
        }
        const __m256i scale = load_i8x8(scales + g * kPanel);
        for (int m = 0; m < MT; ++m) {
            const __m256i offset = _mm256_set1_epi32(32 * x[m]->sum[g]);
            out[m] = _mm256_add_epi32(out[m], _mm256_mullo_epi32(_mm256_sub_epi32(dots[m].sum, offset), scale));
        }
    }
}

// How far ahead of the kernel's loads the stream is prefetched: the hardware prefetcher alone left
// decode at a quarter of the memory's bandwidth.
constexpr int64_t kPrefetchBytes = 1024;

inline void prefetch(const std::byte* p, int64_t bytes) {
    for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(reinterpret_cast<const char*>(p + at), _MM_HINT_T0);
}

template <DType T, int MT, int NH>
void tile(const ActivationBlock* x, int64_t ldx, const std::byte* group, int64_t n_blocks, int h0, int64_t sb0,
          int64_t sb1, float* out) {
    constexpr panels::QuantLayout l = panels::layout(T);
    constexpr int64_t subs = l.block / 32;  // sub-blocks of 32 per block
    const int64_t block_stride = kGroup * l.chunk;
    __m256 acc[MT][NH];
    for (int m = 0; m < MT; ++m)
        for (int h = 0; h < NH; ++h) acc[m][h] = _mm256_setzero_ps();
    for (int64_t sb = sb0; sb < sb1; ++sb) {
        const int64_t b = sb / subs, j = sb % subs;
        if (j == 0) prefetch(group + b * block_stride + kPrefetchBytes, NH * l.chunk / 2);
        const ActivationBlock* xs[MT];
        for (int m = 0; m < MT; ++m) xs[m] = x + m * ldx + sb;
        for (int h = 0; h < NH; ++h) {
            const int panel = (h0 + h) / 2, half = (h0 + h) % 2;
            const std::byte* chunk = group + b * block_stride + panel * l.chunk;
            __m256i sums[MT];
            const std::byte* values = chunk + l.values + half * 32;
            if constexpr (T == DType::Q8_0) dot_q8<MT>(values, xs, sums);
            else if constexpr (T == DType::Q5_0) dot_q5<MT>(values, chunk + l.high_bits + half * 32, xs, sums);
            else if constexpr (T == DType::Q6_K)
                dot_q6<MT>(values + j * 4 * 64, chunk + l.high_bits + j * 2 * 64 + half * 32,
                           chunk + l.sub_scales + j * 2 * kPanel + half * 8, xs, sums);
            else dot_q4<MT>(values + j * 4 * 64, xs, sums);  // Q4_0, Q4_K
            const __m256 d = load_f16x8(chunk + l.d + half * 16);
            for (int m = 0; m < MT; ++m) {
                const float dx = xs[m]->d;
                const int32_t sum = xs[m]->sum[0] + xs[m]->sum[1];
                __m256i isum = sums[m];
                if constexpr (T == DType::Q4_0) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * sum));
                if constexpr (T == DType::Q5_0) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(16 * sum));
                if constexpr (T == DType::Q4_K) {
                    const std::byte* sc = chunk + l.sub_scales + j * kPanel + half * 8;
                    const std::byte* mn = chunk + l.sub_mins + j * kPanel + half * 8;
                    const __m256 scale = _mm256_mul_ps(d, _mm256_cvtepi32_ps(load_u8x8(sc)));
                    const __m256 min = _mm256_mul_ps(load_f16x8(chunk + l.dmin + half * 16), _mm256_cvtepi32_ps(load_u8x8(mn)));
                    acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(scale, _mm256_set1_ps(dx)), acc[m][h]);
                    acc[m][h] = _mm256_fnmadd_ps(min, _mm256_set1_ps(dx * static_cast<float>(sum)), acc[m][h]);
                } else {
                    acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc[m][h]);
                }
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int h = 0; h < NH; ++h) _mm256_storeu_ps(out + (m * NH + h) * kHalfRows, acc[m][h]);
}

using TileFn = void (*)(const ActivationBlock*, int64_t, const std::byte*, int64_t, int, int64_t, int64_t, float*);

// Every tile shape: 1..4 tokens x 1..8 halves. Many tokens x few halves would reread a group's
// interleaved chunks once per half, which left batched decode at 3x the per-token cost of prefill.
template <DType T, int... I>
constexpr std::array<TileFn, sizeof...(I)> tile_table(std::integer_sequence<int, I...>) {
    return {tile<T, I / kQuantTileHalves + 1, I % kQuantTileHalves + 1>...};
}

template <DType T>
TileFn pick(int mt, int nh) {
    static constexpr auto table = tile_table<T>(std::make_integer_sequence<int, kQuantTileTokens * kQuantTileHalves>{});
    return table[(mt - 1) * kQuantTileHalves + (nh - 1)];
}

}  // namespace

void quant_tile(DType type, int mt, int nh, const quant::ActivationBlock* x, int64_t ldx, const std::byte* group,
                int64_t n_blocks, int h0, int64_t sb0, int64_t sb1, float* tile) {
    LLAISYS_CHECK(1 <= mt && mt <= kQuantTileTokens && 1 <= nh && nh <= kQuantTileHalves, "quant_tile: tile shape");
    TileFn fn = nullptr;
    switch (type) {
        case DType::Q8_0: fn = pick<DType::Q8_0>(mt, nh); break;
        case DType::Q4_0: fn = pick<DType::Q4_0>(mt, nh); break;
        case DType::Q5_0: fn = pick<DType::Q5_0>(mt, nh); break;
        case DType::Q4_K: fn = pick<DType::Q4_K>(mt, nh); break;
        case DType::Q6_K: fn = pick<DType::Q6_K>(mt, nh); break;
        default: fail(__FILE__, __LINE__, std::string("quant_tile: not a quantized dtype: ") + dtype_name(type));
    }
    fn(x, ldx, group, n_blocks, h0, sb0, sb1, tile);
}

}  // namespace llaisys::ops::tiles
