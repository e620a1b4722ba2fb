// SwiGLU, out = silu(gate) * up: the MLP's activation. A prompt runs it over [tokens, MLP width],
// as many values as a projection has outputs, so exp is vectorised here (scalar expf made it cost
// more than the prompt's attention). Every lane computes alone, with the same instructions (a
// partial last vector is padded, not finished in scalar code), so a value's bits depend on its
// inputs only: not on its column, the row length or the rank count.
#include <algorithm>
#include <immintrin.h>

#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {
namespace {

#if defined(__AVX512F__)
using Vec = __m512;
using IVec = __m512i;
constexpr int kLanes = 16;
inline Vec set1(float v) { return _mm512_set1_ps(v); }
inline Vec load(const float* p, int n) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p); }
inline void store(float* p, Vec v, int n) { _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v); }
inline Vec clamp(Vec x, float lo, float hi) { return _mm512_min_ps(_mm512_max_ps(x, set1(lo)), set1(hi)); }
inline Vec round_even(Vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec pow2(Vec n) {  // 2^n for integral n in [-126, 127]
    const IVec bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(bits);
}
#else
using Vec = __m256;
using IVec = __m256i;
constexpr int kLanes = 8;
inline Vec set1(float v) { return _mm256_set1_ps(v); }
inline Vec load(const float* p, int n) {
    alignas(32) float lanes[kLanes] = {};
    for (int i = 0; i < n; ++i) lanes[i] = p[i];
    return _mm256_load_ps(lanes);
}
inline void store(float* p, Vec v, int n) {
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, v);
    for (int i = 0; i < n; ++i) p[i] = lanes[i];
}
inline Vec clamp(Vec x, float lo, float hi) { return _mm256_min_ps(_mm256_max_ps(x, set1(lo)), set1(hi)); }
inline Vec round_even(Vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec pow2(Vec n) {
    const IVec bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(bits);
}
#endif

// e^x: Cody-Waite reduction x = n ln2 + r with |r| <= ln2 / 2, Cephes' expf polynomial for e^r
// (within about 1 ulp of expf), times 2^n. x is clamped to [-87, 88], where e^x and 2^n stay normal
// floats; silu's limits (0 far below zero, x far above) still come out.
inline Vec exp_vec(Vec x) {
    x = clamp(x, -87.0f, 88.0f);
    const Vec n = round_even(x * set1(1.44269504088896341f));
    Vec r = fma(n, set1(-0.693359375f), x);  // ln2 in two parts: the first exact in a few bits
    r = fma(n, set1(2.12194440e-4f), r);
    Vec p = set1(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        p = fma(p, r, set1(c));
    p = fma(p, r * r, r) + set1(1.0f);
    return p * pow2(n);
}

}  // namespace

void swiglu(Tensor& out, const Tensor& gate, const Tensor& up) {
    elementwise(out, gate, up, "swiglu", [](const float* g, const float* u, float* y, int64_t n) {
        for (int64_t i = 0; i < n; i += kLanes) {
            const int lanes = static_cast<int>(std::min<int64_t>(kLanes, n - i));
            const Vec gv = load(g + i, lanes);
            store(y + i, gv / (set1(1.0f) + exp_vec(-gv)) * load(u + i, lanes), lanes);
        }
    });
}

}  // namespace llaisys::ops
