#include "quant.hpp"

#include <cmath>
#include <cstring>
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

void quantize_activations(const float* x, ActivationBlock* out, int64_t n) {
    LLAISYS_CHECK(n % 32 == 0, "quantize_activations: whole blocks of 32 only");
    for (int64_t b = 0; b < n / 32; ++b, x += 32) {
        float amax = 0.0f;
        for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        ActivationBlock& block = out[b];
        block.d = d;
        int sums[2] = {0, 0};
        for (int i = 0; i < 32; ++i) {
            block.q[i] = static_cast<int8_t>(std::nearbyint(x[i] * id));
            sums[i / 16] += block.q[i];
        }
        block.sum[0] = static_cast<int16_t>(sums[0]);
        block.sum[1] = static_cast<int16_t>(sums[1]);
    }
}

}  // namespace llaisys::quant
