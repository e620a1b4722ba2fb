#include <cmath>
#include <limits>

#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {
namespace {

// The cache's rows come as f32 either way; bf16 widening is a shift.
inline float cache_at(const Tensor& cache, const std::byte* row, int64_t i) {
    if (cache.dtype == DType::F32) return reinterpret_cast<const float*>(row)[i];
    if (cache.dtype == DType::BF16) return bf16_to_f32(reinterpret_cast<const uint16_t*>(row)[i]);
    return f16_to_f32(reinterpret_cast<const uint16_t*>(row)[i]);
}

inline const std::byte* cache_row(const Tensor& cache, int64_t head, int64_t pos) {
    return cache.base + (head * cache.strides[0] + pos * cache.strides[1]) * dtype_size(cache.dtype);
}

}  // namespace

void self_attention(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                    const std::vector<int64_t>& kv_head_of, int64_t n_past, float scale) {
    LLAISYS_CHECK(q.ndim() == 3 && out.shape == q.shape, "self_attention: q and out must be [M, H, d]");
    int64_t M = q.size(0), H = q.size(1), d = q.size(2);
    check_rows(q, d, "self_attention q");
    check_rows(out, d, "self_attention out");
    LLAISYS_CHECK(k_cache.ndim() == 3 && k_cache.shape == v_cache.shape && k_cache.size(2) == d &&
                      k_cache.strides[2] == 1 && v_cache.strides == k_cache.strides,
                  "self_attention: caches must be [H_kv, capacity, d]");
    LLAISYS_CHECK(static_cast<int64_t>(kv_head_of.size()) == H, "self_attention: one cache head per query head");
    for (int64_t kv : kv_head_of) LLAISYS_CHECK(0 <= kv && kv < k_cache.size(0), "self_attention: cache head out of range");
    LLAISYS_CHECK(n_past >= 0 && n_past + M <= k_cache.size(1), "self_attention: positions exceed the cache");

#pragma omp parallel
    {
        std::vector<float> scores(n_past + M), qs, acc(d);
#pragma omp for schedule(static) collapse(2)
        for (int64_t h = 0; h < H; ++h) {
            for (int64_t m = 0; m < M; ++m) {
                const float* qr = row_f32(q, m * H + h, qs);
                int64_t kv = kv_head_of[h], n_keys = n_past + m + 1;  // causal: up to its own position
                float max_score = -std::numeric_limits<float>::infinity();
                for (int64_t j = 0; j < n_keys; ++j) {
                    const std::byte* kr = cache_row(k_cache, kv, j);
                    float dot = 0.0f;
                    for (int64_t i = 0; i < d; ++i) dot += qr[i] * cache_at(k_cache, kr, i);
                    scores[j] = dot * scale;
                    max_score = std::max(max_score, scores[j]);
                }
                float total = 0.0f;
                for (int64_t j = 0; j < n_keys; ++j) {
                    scores[j] = std::exp(scores[j] - max_score);
                    total += scores[j];
                }
                std::fill(acc.begin(), acc.end(), 0.0f);
                for (int64_t j = 0; j < n_keys; ++j) {
                    const std::byte* vr = cache_row(v_cache, kv, j);
                    float weight = scores[j] / total;
                    for (int64_t i = 0; i < d; ++i) acc[i] += weight * cache_at(v_cache, vr, i);
                }
                store_row(out, m * H + h, acc.data());
            }
        }
    }
}

}  // namespace llaisys::ops
