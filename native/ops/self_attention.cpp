#include <cmath>
#include <cstring>
#include <limits>

#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {
namespace {

// Vectors of the machine's register width: GCC spills wider ones through the stack.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float f32xL __attribute__((vector_size(kLanes * 4)));
typedef uint32_t u32xL __attribute__((vector_size(kLanes * 4)));
typedef uint16_t u16xL __attribute__((vector_size(kLanes * 2)));

// kLanes cache elements widened to f32 (bf16 is a 16-bit shift; f16 goes through the scalar path).
template <class T>
inline f32xL load_lanes(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
        f32xL v;
        std::memcpy(&v, p, sizeof v);
        return v;
    } else {
        u16xL bits;
        std::memcpy(&bits, p, sizeof bits);
        return (f32xL)(__builtin_convertvector(bits, u32xL) << 16);
    }
}

template <class T>
inline float widen(T v, DType dtype) {
    if constexpr (std::is_same_v<T, float>) return v;
    else return dtype == DType::F16 ? f16_to_f32(v) : bf16_to_f32(v);
}

// q . k over d elements; the vector path serves f32 and bf16 caches.
template <class T>
inline float dot(const float* q, const T* k, int64_t d, DType dtype) {
    int64_t i = 0;
    float total = 0.0f;
    if (dtype != DType::F16) {
        f32xL acc = {};
        for (; i + kLanes <= d; i += kLanes) {
            f32xL qv;
            std::memcpy(&qv, q + i, sizeof qv);
            acc += qv * load_lanes(k + i);
        }
        for (int lane = 0; lane < kLanes; ++lane) total += acc[lane];
    }
    for (; i < d; ++i) total += q[i] * widen(k[i], dtype);
    return total;
}

// acc += weight * v over d elements.
template <class T>
inline void axpy(float* acc, float weight, const T* v, int64_t d, DType dtype) {
    int64_t i = 0;
    if (dtype != DType::F16) {
        for (; i + kLanes <= d; i += kLanes) {
            f32xL a;
            std::memcpy(&a, acc + i, sizeof a);
            a += weight * load_lanes(v + i);
            std::memcpy(acc + i, &a, sizeof a);
        }
    }
    for (; i < d; ++i) acc[i] += weight * widen(v[i], dtype);
}

template <class T>
void attend(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
            const std::vector<int64_t>& kv_head_of, int64_t n_past, float scale) {
    const int64_t M = q.size(0), H = q.size(1), d = q.size(2);
    const DType dtype = k_cache.dtype;
    const T* keys = k_cache.data<T>();
    const T* vals = v_cache.data<T>();
    const int64_t head_stride = k_cache.strides[0], pos_stride = k_cache.strides[1];
#pragma omp parallel
    {
        std::vector<float> scores(n_past + M), qs, acc(d);
#pragma omp for schedule(static) collapse(2)
        for (int64_t h = 0; h < H; ++h) {
            for (int64_t m = 0; m < M; ++m) {
                const float* qr = row_f32(q, m * H + h, qs);
                const T* kh = keys + kv_head_of[h] * head_stride;
                const T* vh = vals + kv_head_of[h] * head_stride;
                int64_t n_keys = n_past + m + 1;  // causal: up to its own position
                float max_score = -std::numeric_limits<float>::infinity();
                for (int64_t j = 0; j < n_keys; ++j) {
                    scores[j] = dot(qr, kh + j * pos_stride, d, dtype) * scale;
                    max_score = std::max(max_score, scores[j]);
                }
                float total = 0.0f;
                for (int64_t j = 0; j < n_keys; ++j) {
                    scores[j] = std::exp(scores[j] - max_score);
                    total += scores[j];
                }
                std::fill(acc.begin(), acc.end(), 0.0f);
                for (int64_t j = 0; j < n_keys; ++j) axpy(acc.data(), scores[j] / total, vh + j * pos_stride, d, dtype);
                store_row(out, m * H + h, acc.data());
            }
        }
    }
}

}  // namespace

void self_attention(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                    const std::vector<int64_t>& kv_head_of, int64_t n_past, float scale) {
    LLAISYS_CHECK(q.ndim() == 3 && out.shape == q.shape, "self_attention: q and out must be [M, H, d]");
    int64_t M = q.size(0), H = q.size(1), d = q.size(2);
    check_rows(q, d, "self_attention q");
    check_rows(out, d, "self_attention out");
    LLAISYS_CHECK(k_cache.ndim() == 3 && k_cache.shape == v_cache.shape && k_cache.size(2) == d &&
                      k_cache.strides[2] == 1 && v_cache.strides == k_cache.strides && k_cache.dtype == v_cache.dtype,
                  "self_attention: caches must be [H_kv, capacity, d] of one dtype");
    LLAISYS_CHECK(static_cast<int64_t>(kv_head_of.size()) == H, "self_attention: one cache head per query head");
    for (int64_t kv : kv_head_of) LLAISYS_CHECK(0 <= kv && kv < k_cache.size(0), "self_attention: cache head out of range");
    LLAISYS_CHECK(n_past >= 0 && n_past + M <= k_cache.size(1), "self_attention: positions exceed the cache");
    if (k_cache.dtype == DType::F32) attend<float>(out, q, k_cache, v_cache, kv_head_of, n_past, scale);
    else attend<uint16_t>(out, q, k_cache, v_cache, kv_head_of, n_past, scale);
}

}  // namespace llaisys::ops
