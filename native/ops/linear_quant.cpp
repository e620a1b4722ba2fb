// Integer dot products of quantized weights (panels.hpp) against activations quantized per 32.
//
// Weights hold unsigned integers (Q4: 0-15, Q5: 0-31, Q6: 0-63) or signed ones (Q8), 4 consecutive
// k per row and a register of rows; an activation quad is broadcast to all rows. Unsigned values
// multiply signed activations directly (u8 x s8 products), and the format's offset comes out through
// the activation block's sum: sum((q - o) x) = sum(q x) - o sum(x). The products are summed by
// VNNI's dpbusd where the CPU has it, else by AVX2's maddubs (ByteDots). Each sub-block's integer sum
// turns into f32 with the row scales. Integer sums are exact either way, so all paths give
// bit-identical results.
//
// The kernels are written once for two register widths (Ymm, Zmm below): 8 rows (half a panel) in
// 256 bits, or, with AVX-512 VNNI, a whole 16-row panel in 512 bits, which halves the instructions
// per weight byte: decode at 1-2 threads spent more time in them than in reading memory.
#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <utility>
#include <immintrin.h>

#include "amx.hpp"
#include "panels.hpp"
#include "tiles.hpp"

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "llaisys-chat's kernels need AVX2, FMA and F16C (build with -march=native or LLAISYS_PORTABLE=1)"
#endif

namespace llaisys::ops::tiles {
namespace {

using quant::ActivationBlock;

// 8 rows: AVX2 (and 256-bit VNNI where the CPU has it).
struct Ymm {
    using I = __m256i;
    using F = __m256;
    static constexpr int kRows = 8;
    static I load(const std::byte* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
    static I bytes(char b) { return _mm256_set1_epi8(b); }
    static I int32s(int32_t v) { return _mm256_set1_epi32(v); }
    static I and_(I a, I b) { return _mm256_and_si256(a, b); }
    static I or_(I a, I b) { return _mm256_or_si256(a, b); }
    static I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
    static I shl16(I a, int n) { return _mm256_slli_epi16(a, n); }
    static I shr16(I a, int n) { return _mm256_srli_epi16(a, n); }
    static I add32(I a, I b) { return _mm256_add_epi32(a, b); }
    static I sub32(I a, I b) { return _mm256_sub_epi32(a, b); }
    static I mul32(I a, I b) { return _mm256_mullo_epi32(a, b); }
    static I i8s(const std::byte* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
    static I u8s(const std::byte* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
    static F f16s(const std::byte* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
    static F floats(I v) { return _mm256_cvtepi32_ps(v); }
    static F splat(float v) { return _mm256_set1_ps(v); }
    static F zero() { return _mm256_setzero_ps(); }
    static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
    static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};

#ifdef LLAISYS_ZMM_TILES
// 16 rows (a whole panel): AVX-512 BW and VNNI.
struct Zmm {
    using I = __m512i;
    using F = __m512;
    static constexpr int kRows = 16;
    static I load(const std::byte* p) { return _mm512_loadu_si512(p); }
    static I bytes(char b) { return _mm512_set1_epi8(b); }
    static I int32s(int32_t v) { return _mm512_set1_epi32(v); }
    static I and_(I a, I b) { return _mm512_and_si512(a, b); }
    static I or_(I a, I b) { return _mm512_or_si512(a, b); }
    static I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
    static I shl16(I a, int n) { return _mm512_slli_epi16(a, n); }
    static I shr16(I a, int n) { return _mm512_srli_epi16(a, n); }
    static I add32(I a, I b) { return _mm512_add_epi32(a, b); }
    static I sub32(I a, I b) { return _mm512_sub_epi32(a, b); }
    static I mul32(I a, I b) { return _mm512_mullo_epi32(a, b); }
    static I i8s(const std::byte* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
    static I u8s(const std::byte* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
    static F f16s(const std::byte* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
    static F floats(I v) { return _mm512_cvtepi32_ps(v); }
    static F splat(float v) { return _mm512_set1_ps(v); }
    static F zero() { return _mm512_setzero_ps(); }
    static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
    static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};
#endif

// Activation quad `step` (4 int8) of a block, in every 32-bit lane.
template <class V>
typename V::I quad(const ActivationBlock* a, int step) {
    int32_t v;
    std::memcpy(&v, a->q + 4 * step, sizeof v);
    return V::int32s(v);
}

// Sums of u8 x s8 products, 4 to each 32-bit lane. With VNNI each add() is one dpbusd into 32 bits
// (kExact: no intermediate saturates). Without, maddubs' 16-bit pair sums gather in 16 bits until
// flush() widens them: the caller flushes before they could overflow (the bound depends on the
// format's value range), and keeps every pair sum from saturating (u8 values below 128).
template <class V>
struct ByteDots;

template <>
struct ByteDots<Ymm> {
    __m256i sum = _mm256_setzero_si256();  // 32-bit lanes, complete after flush()
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    static constexpr bool kExact = true;
    void add(__m256i u8, __m256i s8) { sum = _mm256_dpbusd_epi32(sum, u8, s8); }
    void flush() {}
#elif defined(__AVXVNNI__)
    static constexpr bool kExact = true;
    void add(__m256i u8, __m256i s8) { sum = _mm256_dpbusd_avx_epi32(sum, u8, s8); }
    void flush() {}
#else
    static constexpr bool kExact = false;
    __m256i pairs = _mm256_setzero_si256();
    void add(__m256i u8, __m256i s8) { pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(u8, s8)); }
    void flush() {
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
        pairs = _mm256_setzero_si256();
    }
#endif
};

#ifdef LLAISYS_ZMM_TILES
template <>
struct ByteDots<Zmm> {
    static constexpr bool kExact = true;
    __m512i sum = _mm512_setzero_si512();
    void add(__m512i u8, __m512i s8) { sum = _mm512_dpbusd_epi32(sum, u8, s8); }
    void flush() {}
};
#endif

template <class V>
typename V::I low_nibbles(typename V::I v) { return V::and_(v, V::bytes(0x0F)); }
template <class V>
typename V::I high_nibbles(typename V::I v) { return V::and_(V::shr16(v, 4), V::bytes(0x0F)); }

// Integer sums of one sub-block (8 steps) of one register of rows, for MT tokens. `values` points
// at the sub-block's first step (Q8) or pair (others) of these rows.
template <class V, int MT>
[[gnu::always_inline]] inline void dot_q8(const std::byte* values, const ActivationBlock* const* x, typename V::I* out) {
    ByteDots<V> dots[MT];
    if constexpr (ByteDots<V>::kExact) {  // w + 128 is unsigned: sum(w x) = sum((w + 128) x) - 128 sum(x)
        for (int s = 0; s < 8; ++s) {
            const typename V::I w = V::xor_(V::load(values + s * 64), V::bytes(static_cast<char>(0x80)));
            for (int m = 0; m < MT; ++m) dots[m].add(w, quad<V>(x[m], s));
        }
        for (int m = 0; m < MT; ++m) out[m] = V::sub32(dots[m].sum, V::int32s(128 * (x[m]->sum[0] + x[m]->sum[1])));
    } else {  // maddubs would saturate on w + 128: |w| times x with w's sign
        for (int s = 0; s < 8; ++s) {
            const __m256i w = V::load(values + s * 64), magnitude = _mm256_sign_epi8(w, w);
            for (int m = 0; m < MT; ++m) {
                dots[m].add(magnitude, _mm256_sign_epi8(quad<V>(x[m], s), w));
                dots[m].flush();  // two pair sums could overflow 16 bits
            }
        }
        for (int m = 0; m < MT; ++m) out[m] = dots[m].sum;
    }
}

// 4-bit values: 8 steps of pair sums (at most 8 * 2 * 15 * 127) fit 16 bits. The sub-block's values
// are unpacked once, then each token's sums run through them in turn: with the tokens' sums side by
// side instead, 4 tokens' AVX2 prompt tiles spilled them to the stack, and prefilled 1.15x slower
// (Q4_0, AMD Zen 3).
template <class V, int MT>
[[gnu::always_inline]] inline void dot_q4(const std::byte* pairs, const ActivationBlock* const* x, typename V::I* out) {
    typename V::I lo[4], hi[4];
    for (int j = 0; j < 4; ++j) {
        const typename V::I v = V::load(pairs + j * 64);
        lo[j] = low_nibbles<V>(v), hi[j] = high_nibbles<V>(v);
    }
    for (int m = 0; m < MT; ++m) {
        ByteDots<V> dots;
        for (int j = 0; j < 4; ++j) {
            dots.add(lo[j], quad<V>(x[m], 2 * j));
            dots.add(hi[j], quad<V>(x[m], 2 * j + 1));
        }
        dots.flush();
        out[m] = dots.sum;
    }
}

// Bit 4 of step s's values: bit s of the plane's bytes, moved to bit 4 (16-bit shifts: what crosses
// into the other byte of a pair never reaches bit 4).
template <class V>
typename V::I plane_bit(typename V::I plane, int s) {
    const typename V::I shifted = s <= 4 ? V::shl16(plane, 4 - s) : V::shr16(plane, s - 4);
    return V::and_(shifted, V::bytes(0x10));
}

// 5-bit values: the high bit of step s is bit s of the plane's byte; 4 steps fit 16 bits.
template <class V, int MT>
[[gnu::always_inline]] inline void dot_q5(const std::byte* pairs, const std::byte* plane, const ActivationBlock* const* x,
                                          typename V::I* out) {
    const typename V::I bits = V::load(plane);
    ByteDots<V> dots[MT];
    for (int j = 0; j < 4; ++j) {
        const typename V::I v = V::load(pairs + j * 64);
        const typename V::I lo = V::or_(low_nibbles<V>(v), plane_bit<V>(bits, 2 * j));
        const typename V::I hi = V::or_(high_nibbles<V>(v), plane_bit<V>(bits, 2 * j + 1));
        for (int m = 0; m < MT; ++m) {
            dots[m].add(lo, quad<V>(x[m], 2 * j));
            dots[m].add(hi, quad<V>(x[m], 2 * j + 1));
            if (j % 2 == 1) dots[m].flush();
        }
    }
    for (int m = 0; m < MT; ++m) out[m] = dots[m].sum;
}

// The top 2 bits of step s' (0-3) of a Q6_K plane, at bits 4-5 of each byte.
template <class V>
typename V::I plane_bits(typename V::I plane, int s) {
    const typename V::I shifted = s == 0 ? V::shl16(plane, 4) : s == 1 ? V::shl16(plane, 2) : s == 2 ? plane : V::shr16(plane, 2);
    return V::and_(shifted, V::bytes(0x30));
}

// 6-bit values in two groups of 16 (4 steps) with int8 scales: sum over groups of
// scale * (sum(q x) - 32 sum(x)); 2 steps of pair sums fit 16 bits.
template <class V, int MT>
[[gnu::always_inline]] inline void dot_q6(const std::byte* pairs, const std::byte* planes, const std::byte* scales,
                                          const ActivationBlock* const* x, typename V::I* out) {
    for (int m = 0; m < MT; ++m) out[m] = V::int32s(0);
    for (int g = 0; g < 2; ++g) {
        const typename V::I plane = V::load(planes + g * 64);
        ByteDots<V> dots[MT];
        for (int j = 2 * g; j < 2 * g + 2; ++j) {
            const typename V::I v = V::load(pairs + j * 64);
            const typename V::I lo = V::or_(low_nibbles<V>(v), plane_bits<V>(plane, 2 * (j - 2 * g)));
            const typename V::I hi = V::or_(high_nibbles<V>(v), plane_bits<V>(plane, 2 * (j - 2 * g) + 1));
            for (int m = 0; m < MT; ++m) {
                dots[m].add(lo, quad<V>(x[m], 2 * j));
                dots[m].add(hi, quad<V>(x[m], 2 * j + 1));
                dots[m].flush();
            }
        }
        const typename V::I scale = V::i8s(scales + g * kPanel);
        for (int m = 0; m < MT; ++m) {
            const typename V::I offset = V::int32s(32 * x[m]->sum[g]);
            out[m] = V::add32(out[m], V::mul32(V::sub32(dots[m].sum, offset), scale));
        }
    }
}

// The float scales of one sub-block of a register of rows: d (Q4_K: d times the sub-block's scale)
// and, for Q4_K, the minimum's scale.
template <class V, DType T>
struct RowScales {
    typename V::F d, min;
};

template <class V, DType T>
[[gnu::always_inline]] inline RowScales<V, T> row_scales(const std::byte* chunk, int64_t j, int row) {
    constexpr panels::QuantLayout l = panels::layout(T);
    const typename V::F d = V::f16s(chunk + l.d + row * 2);
    if constexpr (T == DType::Q4_K)
        return {V::mul(d, V::floats(V::u8s(chunk + l.sub_scales + j * kPanel + row))),
                V::mul(V::f16s(chunk + l.dmin + row * 2), V::floats(V::u8s(chunk + l.sub_mins + j * kPanel + row)))};
    else return {d, V::zero()};
}

// acc plus one sub-block's part of a token's dot products with a register of rows: isum holds the
// integer sums of (value - the format's offset) x activation, which the row and activation scales
// turn into floats. Every path (decode, batch, prompt) ends here, so all give the same bits.
template <class V, DType T>
[[gnu::always_inline]] inline typename V::F accumulate(typename V::F acc, const RowScales<V, T>& s, const ActivationBlock* x,
                                                      typename V::I isum) {
    const float dx = x->d;
    acc = V::fmadd(V::floats(isum), V::mul(s.d, V::splat(dx)), acc);
    if constexpr (T == DType::Q4_K) acc = V::fnmadd(s.min, V::splat(dx * static_cast<float>(x->sum[0] + x->sum[1])), acc);
    return acc;
}

// How far ahead of the kernel's loads a stream of 32-value blocks is prefetched: the hardware
// prefetcher alone left decode at a quarter of the memory's bandwidth. Into L2 (T1), not L1: decode
// 1.01-1.03x at 1-2 threads and 2 ranks on the 2-core machine, where 2048 bytes ahead was 0.96-0.98x.
// (256-value blocks prefetch their own way: tile() below.)
constexpr int64_t kPrefetchBytes = 1024;

template <_mm_hint Hint>
void prefetch(const std::byte* p, int64_t bytes) {
    for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(reinterpret_cast<const char*>(p + at), Hint);
}

// Units of V::kRows rows: u0 .. u0 + NU of the group, whose output goes to out[(m * NU + u) * kRows + r].
template <class V, DType T, int MT, int NU>
void tile(const ActivationBlock* x, int64_t ldx, const std::byte* group, int64_t n_blocks, int u0, int64_t sb0,
          int64_t sb1, float* out) {
    constexpr panels::QuantLayout l = panels::layout(T);
    constexpr int64_t subs = l.block / 32;  // sub-blocks of 32 per block
    const int64_t block_stride = kGroup * l.chunk;
    typename V::F acc[MT][NU];
    for (int m = 0; m < MT; ++m)
        for (int u = 0; u < NU; ++u) acc[m][u] = V::zero();
    // Where each unit's rows start in a block's chunks: its group's and panel's chunk, and its first
    // row there. Units past a group's are the next group's, a whole stream further on.
    constexpr int group_units = kGroup * kPanel / V::kRows;
    const int64_t group_stride = n_blocks * block_stride;
    constexpr bool kGroups = NU > group_units;
    int64_t panel_at[NU];
    int row_of[NU];
    for (int u = 0; u < NU; ++u) {
        const int in_group = (u0 + u) % group_units;
        panel_at[u] = (u0 + u) / group_units * group_stride + in_group * V::kRows / kPanel * l.chunk;
        row_of[u] = in_group * V::kRows % kPanel;
    }
    const int g0 = u0 / group_units, g1 = (u0 + NU - 1) / group_units;  // the groups spanned
    constexpr int64_t unit_bytes = l.chunk * V::kRows / kPanel;               // a unit's part of a block
    // Block by block, each unit runs through all its sub-blocks, so that a stream is read in order:
    // the same sums in the same order as sub-block by sub-block over all units, which read a 256-value
    // block's chunks in strides and streamed Q4_K and Q6_K at 0.5 of one core's bandwidth.
    for (int64_t b = sb0 / subs; b * subs < sb1; ++b) {
        const int64_t j0 = std::max<int64_t>(sb0 - b * subs, 0), j1 = std::min<int64_t>(sb1 - b * subs, subs);
        if constexpr (subs == 1)  // the units' bytes of each group, a little ahead
            for (int g = g0; g <= g1; ++g) {
                const int first = std::max(u0, g * group_units), last = std::min(u0 + NU, (g + 1) * group_units);
                prefetch<_MM_HINT_T1>(group + g * group_stride + b * block_stride + (first % group_units) * unit_bytes +
                                          kPrefetchBytes,
                                      (last - first) * unit_bytes);
            }
        // Unrolled, so that the accumulators stay in registers (as a loop, gcc kept them in memory
        // and recomputed each unit's address: a third of the instructions of a Q8_0 decode step).
#pragma GCC unroll 16
        for (int u = 0; u < NU; ++u) {
            // A tile of several groups starts at a group's first unit (quant_tile checks), so its
            // units' places are constants apart: a table of them took more registers than there are.
            const int row = kGroups ? (u % group_units) * V::kRows % kPanel : row_of[u];
            const std::byte* chunk = group + b * block_stride +
                                     (kGroups ? u / group_units * group_stride + (u % group_units) * V::kRows / kPanel * l.chunk : panel_at[u]);
            if constexpr (subs > 1) {
                // This unit's bytes of the next block, or past the stream's end those of the next
                // tile's groups (a thread's next tile is most often the groups that follow), into L1:
                // the 1.5B built-in decoded 1.33x / 1.27x at 1 / 2 threads (AMD Zen 4) against a
                // sub-block's share of all units at a time into L2; into L2 here, 1.05x / 1.13x.
                const std::byte* next = b + 1 < n_blocks ? chunk + block_stride : chunk - b * block_stride + (g1 - g0 + 1) * group_stride;
                prefetch<_MM_HINT_T0>(next + row / V::kRows * unit_bytes, unit_bytes);  // 256-bit units: half a chunk
            }
            const std::byte* values = chunk + l.values + row * 4;
            for (int64_t j = j0; j < j1; ++j) {
                const ActivationBlock* xs[MT];
                for (int m = 0; m < MT; ++m) xs[m] = x + m * ldx + b * subs + j;
                typename V::I sums[MT];
                if constexpr (T == DType::Q8_0) dot_q8<V, MT>(values, xs, sums);
                else if constexpr (T == DType::Q5_0) dot_q5<V, MT>(values, chunk + l.high_bits + row * 4, xs, sums);
                else if constexpr (T == DType::Q6_K)
                    dot_q6<V, MT>(values + j * 4 * 64, chunk + l.high_bits + j * 2 * 64 + row * 4,
                                  chunk + l.sub_scales + j * 2 * kPanel + row, xs, sums);
                else dot_q4<V, MT>(values + j * 4 * 64, xs, sums);  // Q4_0, Q4_K
                const RowScales<V, T> scales = row_scales<V, T>(chunk, j, row);
                for (int m = 0; m < MT; ++m) {
                    const int32_t sum = xs[m]->sum[0] + xs[m]->sum[1];  // the offsets that dot_q4/q5 leave in
                    if constexpr (T == DType::Q4_0) sums[m] = V::sub32(sums[m], V::int32s(8 * sum));
                    if constexpr (T == DType::Q5_0) sums[m] = V::sub32(sums[m], V::int32s(16 * sum));
                    acc[m][u] = accumulate<V, T>(acc[m][u], scales, xs[m], sums[m]);
                }
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int u = 0; u < NU; ++u) V::store(out + (m * NU + u) * V::kRows, acc[m][u]);
}

using TileFn = void (*)(const ActivationBlock*, int64_t, const std::byte*, int64_t, int, int64_t, int64_t, float*);

// Every tile shape: 1..4 tokens x 1..(max_tile_groups(tokens) groups' units). Many tokens x few
// units would reread a group's interleaved chunks once per unit, which left batched decode at 3x the
// per-token cost of prefill.
template <class V, DType T, int MT, int NU>
constexpr TileFn tile_or_none() {
    constexpr int group_units = kGroup * kPanel / V::kRows;
#ifdef LLAISYS_ZMM_TILES
    // With 512-bit tiles, 256-bit ones only take odd halves within a group (run() below).
    if constexpr (std::is_same_v<V, Ymm> && NU > group_units) return nullptr;
#endif
    if constexpr (NU > max_tile_groups(MT) * group_units) return nullptr;
    else return &tile<V, T, MT, NU>;
}

template <class V, DType T, int... I>
constexpr std::array<TileFn, sizeof...(I)> tile_table(std::integer_sequence<int, I...>) {
    constexpr int units = kMaxTileGroups * kGroup * kPanel / V::kRows;
    return {tile_or_none<V, T, I / units + 1, I % units + 1>()...};
}

template <class V, DType T>
TileFn pick(int mt, int nu) {
    constexpr int units = kMaxTileGroups * kGroup * kPanel / V::kRows;
    static constexpr auto table = tile_table<V, T>(std::make_integer_sequence<int, kQuantTileTokens * units>{});
    return table[(mt - 1) * units + (nu - 1)];
}

template <DType T>
void run(int mt, int nh, const ActivationBlock* x, int64_t ldx, const std::byte* group, int64_t n_blocks, int h0,
         int64_t sb0, int64_t sb1, float* out) {
#ifdef LLAISYS_ZMM_TILES
    if (h0 % 2 == 0 && nh % 2 == 0) return pick<Zmm, T>(mt, nh / 2)(x, ldx, group, n_blocks, h0 / 2, sb0, sb1, out);
    if (nh > kQuantTileHalves) {  // several groups (so h0 = 0), an odd number of halves: the last one apart
        float even[kQuantTileTokens * kMaxTileGroups * kQuantTileHalves * kHalfRows], last[kQuantTileTokens * kHalfRows];
        pick<Zmm, T>(mt, nh / 2)(x, ldx, group, n_blocks, 0, sb0, sb1, even);
        pick<Ymm, T>(mt, 1)(x, ldx, group, n_blocks, nh - 1, sb0, sb1, last);
        for (int m = 0; m < mt; ++m) {
            std::copy_n(even + m * (nh - 1) * kHalfRows, (nh - 1) * kHalfRows, out + m * nh * kHalfRows);
            std::copy_n(last + m * kHalfRows, kHalfRows, out + (m * nh + nh - 1) * kHalfRows);
        }
        return;
    }
#endif
    pick<Ymm, T>(mt, nh)(x, ldx, group, n_blocks, h0, sb0, sb1, out);
}


#ifdef LLAISYS_ZMM_TILES
// ---- Prompts on AMX: 16 x 16 int32 sums of a sub-block in one instruction ----
//
// A prompt's tile is 32 tokens x 32 rows (two panels of the group) in four 16 x 16 quarters. For each
// sub-block of 32 k, AMX's int8 tile product gives each quarter's exact integer sums: the activations
// are the A tiles (16 tokens x 32 bytes, side by side in the caller's interleaved blocks), the panels'
// values the B tiles (8 steps x 16 rows x 4 bytes: the chunks' own layout, so Q8_0 loads them directly
// and the other formats widen their values to signed bytes first, their offset taken off).
// accumulate() then scales the sums with the same float steps as decode, so the bits match. Four
// independent quarters a sub-block let the tile unit overlap its products: one 16 x 16 tile at a time
// ran at 1.3-1.7x the VNNI kernel, four at 1.9x (Q8_0, 128 tokens x 896 x 4864, 1 thread). Scaling
// the sums costs about as much as the products.
namespace amx {
using namespace ops::amx;

// Tile registers: 0-3 the sums of quarter (token half t, panel or group p) at 2t + p, 4-5 the token
// halves' activations, 6-7 the values of the panels (or of Q6_K's two groups of 16 k: `k` = 16).
Config quarters(int k) {
    Config c;
    for (int t = 0; t < 8; ++t) c.set(t, t >= 6 ? k / 4 : 16, t == 4 || t == 5 ? k : 64);
    return c;
}

void configure(int k) {
    static const Config whole = quarters(32), halves = quarters(16);
    ops::amx::configure(k == 32 ? whole : halves);
}

// The format's values of sub-block j, widened to signed bytes with its offset taken off (Q4_0: 8,
// Q5_0: 16, Q6_K: 32; Q4_K's minimum is scaled apart), in the B layout: 8 steps of 64 bytes.
template <DType T>
void widen(const std::byte* chunk, int64_t j, std::byte* steps) {
    using V = Zmm;
    constexpr panels::QuantLayout l = panels::layout(T);
    constexpr char offset = T == DType::Q4_0 ? 8 : T == DType::Q5_0 ? 16 : T == DType::Q6_K ? 32 : 0;
    const std::byte* pairs = chunk + l.values + j * 4 * 64;
    V::I bits;
    if constexpr (T == DType::Q5_0) bits = V::load(chunk + l.high_bits);
    for (int p = 0; p < 4; ++p) {
        const V::I v = V::load(pairs + p * 64);
        V::I lo = low_nibbles<V>(v), hi = high_nibbles<V>(v);
        if constexpr (T == DType::Q5_0) {
            lo = V::or_(lo, plane_bit<V>(bits, 2 * p));
            hi = V::or_(hi, plane_bit<V>(bits, 2 * p + 1));
        }
        if constexpr (T == DType::Q6_K) {
            const V::I plane = V::load(chunk + l.high_bits + j * 2 * 64 + (p / 2) * 64);
            lo = V::or_(lo, plane_bits<V>(plane, 2 * (p % 2)));
            hi = V::or_(hi, plane_bits<V>(plane, 2 * (p % 2) + 1));
        }
        _mm512_store_si512(steps + 2 * p * 64, _mm512_sub_epi8(lo, V::bytes(offset)));
        _mm512_store_si512(steps + (2 * p + 1) * 64, _mm512_sub_epi8(hi, V::bytes(offset)));
    }
}

using Quarters = int32_t[4][16][16];

constexpr int64_t kBlockBytes = sizeof(ActivationBlock);  // the A tiles' row stride: x's tokens lie side by side

// Sub-block j's sums for both token halves (x[0..16), x[16..32)) and both panels' chunks.
template <DType T>
void multiply(const ActivationBlock* x, const std::byte* const chunks[2], int64_t j, Quarters& sums) {
    alignas(64) std::byte steps[2][512];
    const std::byte* values[2];
    for (int p = 0; p < 2; ++p) {
        if constexpr (T == DType::Q8_0) {
            values[p] = chunks[p] + panels::layout(T).values;
        } else {
            widen<T>(chunks[p], j, steps[p]);
            values[p] = steps[p];
        }
    }
    LLAISYS_TILE_ZERO(0); LLAISYS_TILE_ZERO(1); LLAISYS_TILE_ZERO(2); LLAISYS_TILE_ZERO(3);
    LLAISYS_TILE_LOAD(4, x, kBlockBytes);
    LLAISYS_TILE_LOAD(5, x + 16, kBlockBytes);
    LLAISYS_TILE_LOAD(6, values[0], int64_t{64});
    LLAISYS_TILE_LOAD(7, values[1], int64_t{64});
    LLAISYS_TILE_DOT_S8(0, 4, 6); LLAISYS_TILE_DOT_S8(1, 4, 7); LLAISYS_TILE_DOT_S8(2, 5, 6); LLAISYS_TILE_DOT_S8(3, 5, 7);
    LLAISYS_TILE_STORE(0, sums[0], 64); LLAISYS_TILE_STORE(1, sums[1], 64); LLAISYS_TILE_STORE(2, sums[2], 64); LLAISYS_TILE_STORE(3, sums[3], 64);
}

// Q6_K: one panel's chunk; quarter 2t + g holds token half t's sums over group g (16 k).
void multiply_groups(const ActivationBlock* x, const std::byte* chunk, int64_t j, Quarters& sums) {
    alignas(64) std::byte steps[512];
    widen<DType::Q6_K>(chunk, j, steps);
    LLAISYS_TILE_ZERO(0); LLAISYS_TILE_ZERO(1); LLAISYS_TILE_ZERO(2); LLAISYS_TILE_ZERO(3);
    LLAISYS_TILE_LOAD(6, steps, int64_t{64});
    LLAISYS_TILE_LOAD(7, steps + 256, int64_t{64});
    LLAISYS_TILE_LOAD(4, x->q, kBlockBytes);
    LLAISYS_TILE_LOAD(5, x[16].q, kBlockBytes);
    LLAISYS_TILE_DOT_S8(0, 4, 6); LLAISYS_TILE_DOT_S8(2, 5, 6);
    LLAISYS_TILE_LOAD(4, x->q + 16, kBlockBytes);
    LLAISYS_TILE_LOAD(5, x[16].q + 16, kBlockBytes);
    LLAISYS_TILE_DOT_S8(1, 4, 7); LLAISYS_TILE_DOT_S8(3, 5, 7);
    LLAISYS_TILE_STORE(0, sums[0], 64); LLAISYS_TILE_STORE(1, sums[1], 64); LLAISYS_TILE_STORE(2, sums[2], 64); LLAISYS_TILE_STORE(3, sums[3], 64);
}

// out[m * 32 + p * 16 + r] += one sub-block of token m . row r of panel p, for panels p0 <= p < p1.
template <DType T>
void add_sub_block(const ActivationBlock* x, const std::byte* const chunks[2], int64_t j, const Quarters& sums,
                   int p0, int p1, float* out) {
    using V = Zmm;
    for (int p = p0; p < p1; ++p) {
        const RowScales<V, T> scales = row_scales<V, T>(chunks[p], j, 0);
        V::I group_scales[2];
        if constexpr (T == DType::Q6_K)
            for (int g = 0; g < 2; ++g) group_scales[g] = V::i8s(chunks[p] + panels::layout(T).sub_scales + (j * 2 + g) * kPanel);
        for (int t = 0; t < 2; ++t) {
#pragma GCC unroll 16
            for (int r = 0; r < 16; ++r) {
                const int m = t * 16 + r;
                V::I isum;
                if constexpr (T == DType::Q6_K)  // as dot_q6: the groups' sums times their scales
                    isum = V::add32(V::mul32(_mm512_load_si512(sums[2 * t][r]), group_scales[0]),
                                    V::mul32(_mm512_load_si512(sums[2 * t + 1][r]), group_scales[1]));
                else isum = _mm512_load_si512(sums[2 * t + p][r]);
                float* at = out + m * 2 * kPanel + p * kPanel;
                V::store(at, accumulate<V, T>(_mm512_load_ps(at), scales, x + m, isum));
            }
        }
    }
}

template <DType T>
void prompt_tile(const ActivationBlock* x, const std::byte* group, int panel0, int64_t sb0, int64_t sb1,
                 float* out) {
    constexpr panels::QuantLayout l = panels::layout(T);
    constexpr int64_t subs = l.block / 32;
    configure(T == DType::Q6_K ? 16 : 32);
    std::fill(out, out + kPromptTileTokens * 2 * kPanel, 0.0f);
    alignas(64) Quarters sums;
    const auto chunks_of = [&](int64_t sb, const std::byte* chunks[2]) {
        for (int p = 0; p < 2; ++p) chunks[p] = group + ((sb / subs) * kGroup + panel0 + p) * l.chunk;
    };
    constexpr int kPasses = T == DType::Q6_K ? 2 : 1;  // Q6_K's groups take all four quarters: a panel a pass
    for (int pass = 0; pass < kPasses; ++pass) {
        for (int64_t sb = sb0; sb < sb1; ++sb) {
            const std::byte* chunks[2];
            chunks_of(sb, chunks);
            const ActivationBlock* xs = x + sb * kPromptTileTokens;
            if constexpr (T == DType::Q6_K) {
                multiply_groups(xs, chunks[pass], sb % subs, sums);
                add_sub_block<T>(xs, chunks, sb % subs, sums, pass, pass + 1, out);
            } else {
                multiply<T>(xs, chunks, sb % subs, sums);
                add_sub_block<T>(xs, chunks, sb % subs, sums, 0, 2, out);
            }
        }
    }
}

}  // namespace amx
#endif

}  // namespace

void quant_tile(DType type, int mt, int nh, const quant::ActivationBlock* x, int64_t ldx, const std::byte* group,
                int64_t n_blocks, int h0, int64_t sb0, int64_t sb1, float* tile) {
    LLAISYS_CHECK(1 <= mt && mt <= kQuantTileTokens && 1 <= nh && nh <= kQuantTileHalves * max_tile_groups(mt) &&
                      (nh <= kQuantTileHalves || h0 == 0),
                  "quant_tile: tile shape");
    switch (type) {
        case DType::Q8_0: return run<DType::Q8_0>(mt, nh, x, ldx, group, n_blocks, h0, sb0, sb1, tile);
        case DType::Q4_0: return run<DType::Q4_0>(mt, nh, x, ldx, group, n_blocks, h0, sb0, sb1, tile);
        case DType::Q5_0: return run<DType::Q5_0>(mt, nh, x, ldx, group, n_blocks, h0, sb0, sb1, tile);
        case DType::Q4_K: return run<DType::Q4_K>(mt, nh, x, ldx, group, n_blocks, h0, sb0, sb1, tile);
        case DType::Q6_K: return run<DType::Q6_K>(mt, nh, x, ldx, group, n_blocks, h0, sb0, sb1, tile);
        default: fail(__FILE__, __LINE__, std::string("quant_tile: not a quantized dtype: ") + dtype_name(type));
    }
}

bool amx_prompt_tiles() {
#ifdef LLAISYS_ZMM_TILES
    return ops::amx::support().int8;
#else
    return false;
#endif
}

void quant_prompt_tile(DType type, const quant::ActivationBlock* x, const std::byte* group, int panel0,
                       int64_t sb0, int64_t sb1, float* tile) {
    LLAISYS_CHECK(amx_prompt_tiles() && (panel0 == 0 || panel0 == 2), "quant_prompt_tile: needs AMX and a pair of the group's panels");
#ifdef LLAISYS_ZMM_TILES
    switch (type) {
        case DType::Q8_0: return amx::prompt_tile<DType::Q8_0>(x, group, panel0, sb0, sb1, tile);
        case DType::Q4_0: return amx::prompt_tile<DType::Q4_0>(x, group, panel0, sb0, sb1, tile);
        case DType::Q5_0: return amx::prompt_tile<DType::Q5_0>(x, group, panel0, sb0, sb1, tile);
        case DType::Q4_K: return amx::prompt_tile<DType::Q4_K>(x, group, panel0, sb0, sb1, tile);
        case DType::Q6_K: return amx::prompt_tile<DType::Q6_K>(x, group, panel0, sb0, sb1, tile);
        default: break;
    }
#endif
    fail(__FILE__, __LINE__, std::string("quant_prompt_tile: not a quantized dtype: ") + dtype_name(type));
}

}  // namespace llaisys::ops::tiles
