// Vectors of the machine's register width (16 floats with AVX-512, 8 with AVX2) as GCC vector
// types, and the lane-wise math that attention's softmax and the MLP's SwiGLU share. Every lane
// computes alone, so a value's bits do not depend on the lane it lands in.
#pragma once

#include <cstdint>
#include <cstring>
#include <immintrin.h>

namespace llaisys::ops {

// Wider vectors than the registers would make GCC spill them through the stack.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float f32xL __attribute__((vector_size(kLanes * 4)));
typedef uint32_t u32xL __attribute__((vector_size(kLanes * 4)));
typedef uint16_t u16xL __attribute__((vector_size(kLanes * 2)));
typedef int32_t int32xL __attribute__((vector_size(kLanes * 4)));

// a * b + c, rounded once. Explicit, so that every path makes the same roundings whatever the
// compiler would contract.
inline f32xL fused(f32xL a, f32xL b, f32xL c) {
#if defined(__AVX512F__)
    return (f32xL)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
    return (f32xL)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#endif
}

inline f32xL splat(float x) {
#if defined(__AVX512F__)
    return (f32xL)_mm512_set1_ps(x);
#else
    return (f32xL)_mm256_set1_ps(x);
#endif
}

// e^x, kLanes at a time: Cephes' polynomial for expf (within about 2 ulp), where glibc's scalar expf
// took most of a prompt's attention and SwiGLU. x is clamped to [-87, 88], where e^x and the 2^n
// scale stay normal floats: below, e^x (< 2e-38) is flushed to about that; above, it stays finite.
inline f32xL exp_lanes(f32xL x) {
    const f32xL low = splat(-87.0f), high = splat(88.0f);
    x = x < low ? low : x;
    x = x > high ? high : x;
    const f32xL t = x * 1.44269504088896341f + 0.5f;
    f32xL n = __builtin_convertvector(__builtin_convertvector(t, int32xL), f32xL);  // toward zero
    n = n > t ? n - 1.0f : n;                                                         // floor(t)
    const f32xL r = x - n * 0.693359375f + n * 2.12194440e-4f;
    f32xL p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32xL scale = (__builtin_convertvector(n, int32xL) + 127) << 23;
    f32xL two_n;
    std::memcpy(&two_n, &scale, sizeof two_n);
    return p * two_n;
}

// Whether any lane of x is at least t (NaN lanes are not).
inline bool any_at_least(f32xL x, float t) {
#if defined(__AVX512F__)
    return _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(t), _CMP_GE_OQ) != 0;
#else
    return _mm256_movemask_ps(_mm256_cmp_ps((__m256)x, _mm256_set1_ps(t), _CMP_GE_OQ)) != 0;
#endif
}

// The largest of v[i] * scale over i < n, NaNs skipped (they compare false); -inf when there is none.
inline float largest_scaled(const float* v, int64_t n, float scale) {
    constexpr float kLowest = -__builtin_inff();
    f32xL lanes = splat(kLowest);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        f32xL chunk;
        std::memcpy(&chunk, v + i, sizeof chunk);
        chunk *= scale;
        lanes = chunk > lanes ? chunk : lanes;
    }
    float best = kLowest;
    for (int l = 0; l < kLanes; ++l) best = lanes[l] > best ? lanes[l] : best;
    for (; i < n; ++i) best = v[i] * scale > best ? v[i] * scale : best;
    return best;
}

}  // namespace llaisys::ops
