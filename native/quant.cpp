#include "quant.hpp"

#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <string>

namespace llaisys::quant {
namespace {

template <class Block>
const Block& as(const std::byte* p) {
    return *reinterpret_cast<const Block*>(p);
}

}  // namespace

void q4_k_scale_min(const uint8_t* scales, int j, uint8_t* sc, uint8_t* m) {
    if (j < 4) {
        *sc = scales[j] & 63;
        *m = scales[j + 4] & 63;
    } else {
        *sc = (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4);
        *m = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
    }
}

void block_values(DType type, const std::byte* block, uint8_t* q) {
    switch (type) {
        case DType::Q8_0: {
            std::memcpy(q, as<BlockQ8_0>(block).qs, 32);  // signed: the caller reads them as int8
            return;
        }
        case DType::Q4_0: {
            const auto& b = as<BlockQ4_0>(block);
            for (int i = 0; i < 16; ++i) {
                q[i] = b.qs[i] & 15;
                q[i + 16] = b.qs[i] >> 4;
            }
            return;
        }
        case DType::Q5_0: {
            const auto& b = as<BlockQ5_0>(block);
            uint32_t qh;
            std::memcpy(&qh, b.qh, 4);
            for (int i = 0; i < 16; ++i) {
                q[i] = (b.qs[i] & 15) | ((qh >> i) & 1) << 4;
                q[i + 16] = (b.qs[i] >> 4) | ((qh >> (i + 16)) & 1) << 4;
            }
            return;
        }
        case DType::Q4_K: {
            const auto& b = as<BlockQ4_K>(block);
            for (int c = 0; c < 4; ++c)
                for (int i = 0; i < 32; ++i) {
                    q[64 * c + i] = b.qs[32 * c + i] & 15;
                    q[64 * c + 32 + i] = b.qs[32 * c + i] >> 4;
                }
            return;
        }
        case DType::Q6_K: {
            const auto& b = as<BlockQ6_K>(block);
            for (int h = 0; h < 2; ++h) {
                const uint8_t* ql = b.ql + 64 * h;
                const uint8_t* qh = b.qh + 32 * h;
                uint8_t* out = q + 128 * h;
                for (int i = 0; i < 32; ++i) {
                    out[i] = (ql[i] & 15) | ((qh[i] >> 0) & 3) << 4;
                    out[i + 32] = (ql[i + 32] & 15) | ((qh[i] >> 2) & 3) << 4;
                    out[i + 64] = (ql[i] >> 4) | ((qh[i] >> 4) & 3) << 4;
                    out[i + 96] = (ql[i + 32] >> 4) | ((qh[i] >> 6) & 3) << 4;
                }
            }
            return;
        }
        default: fail(__FILE__, __LINE__, std::string("not a quantized dtype: ") + dtype_name(type));
    }
}

void dequantize_row(DType type, const std::byte* src, float* dst, int64_t n) {
    if (!is_quantized(type)) {
        to_f32(dst, src, type, n);
        return;
    }
    const int64_t block = block_elements(type);
    LLAISYS_CHECK(n % block == 0, "dequantize_row: whole blocks only");
    uint8_t q[256];
    for (int64_t b = 0; b < n / block; ++b, src += block_bytes(type), dst += block) {
        block_values(type, src, q);
        switch (type) {
            case DType::Q8_0: {
                float d = f16_to_f32(as<BlockQ8_0>(src).d);
                for (int i = 0; i < 32; ++i) dst[i] = d * static_cast<int8_t>(q[i]);
                break;
            }
            case DType::Q4_0:
            case DType::Q5_0: {
                float d = f16_to_f32(type == DType::Q4_0 ? as<BlockQ4_0>(src).d : as<BlockQ5_0>(src).d);
                int offset = type == DType::Q4_0 ? 8 : 16;
                for (int i = 0; i < 32; ++i) dst[i] = d * (q[i] - offset);
                break;
            }
            case DType::Q4_K: {
                const auto& b = as<BlockQ4_K>(src);
                float d = f16_to_f32(b.d), dmin = f16_to_f32(b.dmin);
                for (int j = 0; j < 8; ++j) {
                    uint8_t sc, m;
                    q4_k_scale_min(b.scales, j, &sc, &m);
                    for (int i = 0; i < 32; ++i) dst[32 * j + i] = d * sc * q[32 * j + i] - dmin * m;
                }
                break;
            }
            default: {  // Q6_K
                const auto& b = as<BlockQ6_K>(src);
                float d = f16_to_f32(b.d);
                for (int i = 0; i < 256; ++i) dst[i] = d * b.scales[i / 16] * (q[i] - 32);
            }
        }
    }
}

void quantize_row(DType type, const float* src, std::byte* dst, int64_t n) {
    LLAISYS_CHECK(type == DType::Q8_0 || type == DType::Q4_0, "quantize_row: quantizes to q8_0 or q4_0");
    LLAISYS_CHECK(n % 32 == 0, "quantize_row: whole blocks of 32 only");
    for (int64_t b = 0; b < n / 32; ++b, src += 32, dst += block_bytes(type)) {
        if (type == DType::Q8_0) {
            float amax = 0.0f;
            for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(src[i]));
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            auto& out = *reinterpret_cast<BlockQ8_0*>(dst);
            out.d = f32_to_f16(d);
            for (int i = 0; i < 32; ++i) out.qs[i] = static_cast<int8_t>(std::roundf(src[i] * id));
        } else {
            float amax = 0.0f, max = 0.0f;  // the value of largest magnitude, first one on ties
            for (int i = 0; i < 32; ++i)
                if (amax < std::fabs(src[i])) {
                    amax = std::fabs(src[i]);
                    max = src[i];
                }
            const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            auto& out = *reinterpret_cast<BlockQ4_0*>(dst);
            out.d = f32_to_f16(d);
            for (int i = 0; i < 16; ++i) {
                int lo = std::min(15, static_cast<int>(static_cast<int8_t>(src[i] * id + 8.5f)));
                int hi = std::min(15, static_cast<int>(static_cast<int8_t>(src[i + 16] * id + 8.5f)));
                out.qs[i] = static_cast<uint8_t>(lo | (hi << 4));
            }
        }
    }
}

void quantize_activations(const float* x, ActivationBlock* out, int64_t n, int64_t stride) {
    LLAISYS_CHECK(n % 32 == 0, "quantize_activations: whole blocks of 32 only");
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < n / 32; ++b, x += 32) {
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(x + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], magnitude));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float d = _mm_cvtss_f32(m4) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        // x * id rounded to the nearest integer, ties to even (as nearbyint in the default mode).
        __m256i q[4];
        for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
        const __m256i q8 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        // The packs work within 128-bit lanes: 4-byte groups come out in the order 0 2 4 6 1 3 5 7.
        const __m256i bytes = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        ActivationBlock& block = out[b * stride];
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(block.q), bytes);
        block.d = d;
        for (int half = 0; half < 2; ++half) {
            const __m256i sum8 = _mm256_add_epi32(q[2 * half], q[2 * half + 1]);
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
            block.sum[half] = static_cast<int16_t>(_mm_cvtsi128_si32(s));
        }
    }
}

}  // namespace llaisys::quant
