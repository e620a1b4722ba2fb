#include <algorithm>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <vector>

#include "../ops.hpp"
#include "lanes.hpp"
#include "rows.hpp"

namespace llaisys::ops {
namespace {

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
            acc = fused(qv, load_lanes(k + i), acc);
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
            a = fused(splat(weight), load_lanes(v + i), a);
            std::memcpy(acc + i, &a, sizeof a);
        }
    }
    for (; i < d; ++i) acc[i] += weight * widen(v[i], dtype);
}

// scores[0, n) <- softmax(scores * scale), kLanes at a time; the last, partial vector is padded
// with the lowest score (its lanes add nothing). `scores` has room for whole vectors.
inline void softmax(float* scores, int64_t n, float scale) {
    const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
    f32xL top = splat(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < padded; j += kLanes) {
        f32xL s;
        std::memcpy(&s, scores + j, sizeof s);
        s *= scale;
        std::memcpy(scores + j, &s, sizeof s);
        if (j + kLanes > n)
            for (int64_t lane = n - j; lane < kLanes; ++lane) s[lane] = -std::numeric_limits<float>::infinity();
        top = s > top ? s : top;
    }
    float max_score = top[0];
    for (int lane = 1; lane < kLanes; ++lane) max_score = std::max(max_score, top[lane]);
    f32xL sum = {};
    for (int64_t j = 0; j < padded; j += kLanes) {
        f32xL s;
        std::memcpy(&s, scores + j, sizeof s);
        s = exp_lanes(s - max_score);
        if (j + kLanes > n)
            for (int64_t lane = n - j; lane < kLanes; ++lane) s[lane] = 0.0f;
        std::memcpy(scores + j, &s, sizeof s);
        sum += s;
    }
    float total = 0.0f;
    for (int lane = 0; lane < kLanes; ++lane) total += sum[lane];
    for (int64_t j = 0; j < padded; j += kLanes) {
        f32xL s;
        std::memcpy(&s, scores + j, sizeof s);
        s /= total;
        std::memcpy(scores + j, &s, sizeof s);
    }
}

// One query's attention: scores against keys [0, n_keys), softmax, then the weighted sum of values.
// `score(n, s)` sets s[j] = q . k_j; `add_values(n, weights)` sets acc = sum_j weights[j] v_j.
template <class Score, class AddValues>
void attend_query(int64_t n_keys, float scale, std::vector<float>& scores, Score score, AddValues add_values) {
    score(n_keys, scores.data());
    softmax(scores.data(), n_keys, scale);
    add_values(n_keys, scores.data());
}

// A key/value head widened to f32 once for all the queries of a prefill. Keys are transposed in
// blocks of kLanes keys (keys[b * d + i] holds dimension i of keys b*kLanes ..), so a query's scores
// for kLanes keys come out of kLanes-wide products with no horizontal sum per key.
struct WidenedHead {
    std::vector<f32xL> keys;    // [ceil(n / kLanes) * d], zeros past the last key
    std::vector<float> values;  // [n * d]
};

template <class T>
void widen_head(WidenedHead& out, const T* k, const T* v, int64_t n, int64_t d, int64_t pos_stride, DType dtype) {
    const int64_t blocks = (n + kLanes - 1) / kLanes;
    out.keys.assign(blocks * d, f32xL{});
    out.values.resize(n * d);
    for (int64_t j = 0; j < n; ++j) {
        f32xL* block = out.keys.data() + (j / kLanes) * d;
        for (int64_t i = 0; i < d; ++i) {
            block[i][j % kLanes] = widen(k[j * pos_stride + i], dtype);
            out.values[j * d + i] = widen(v[j * pos_stride + i], dtype);
        }
    }
}

// Scores of one query against a widened head: the per-key dot()'s operations in its order (lane l
// of the kLanes partial sums takes dimensions l, l + kLanes, ..., then the lanes are added in turn),
// kLanes keys at a time, so the results are bit-identical to it.
inline void widened_scores(const float* q, const WidenedHead& head, int64_t d, int64_t n_keys, float* scores) {
    for (int64_t b = 0; b * kLanes < n_keys; ++b) {
        const f32xL* keys = head.keys.data() + b * d;
        f32xL partial[kLanes] = {};
        for (int64_t i = 0; i < d; i += kLanes)
            for (int lane = 0; lane < kLanes; ++lane) partial[lane] = fused(splat(q[i + lane]), keys[i + lane], partial[lane]);
        f32xL total = {};
        for (int lane = 0; lane < kLanes; ++lane) total += partial[lane];
        const int64_t n = std::min<int64_t>(kLanes, n_keys - b * kLanes);
        for (int64_t j = 0; j < n; ++j) scores[b * kLanes + j] = total[j];
    }
}

// acc = sum_j weights[j] v_j over a widened head, in axpy()'s operations and order.
inline void widened_values(const WidenedHead& head, int64_t d, int64_t n_keys, const float* weights, float* acc) {
    constexpr int64_t kChunk = 8 * kLanes;  // accumulators held in registers at a time
    for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
        const int64_t vectors = std::min(kChunk, d - c0) / kLanes;
        f32xL a[kChunk / kLanes] = {};
        for (int64_t j = 0; j < n_keys; ++j) {
            const float* v = head.values.data() + j * d + c0;
            for (int64_t x = 0; x < vectors; ++x) {
                f32xL vx;
                std::memcpy(&vx, v + x * kLanes, sizeof vx);
                a[x] = fused(splat(weights[j]), vx, a[x]);
            }
        }
        std::memcpy(acc + c0, a, vectors * sizeof(f32xL));
    }
}

// From this many queries on (prefill), heads are widened once per call; fewer (decode) read the
// cache directly. Both give the same bits.
constexpr int64_t kWidenFrom = 8;

template <class T>
void attend(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
            const std::vector<int64_t>& kv_head_of, int64_t n_past, float scale) {
    const int64_t M = q.size(0), H = q.size(1), d = q.size(2), H_kv = k_cache.size(0);
    const DType dtype = k_cache.dtype;
    const T* keys = k_cache.data<T>();
    const T* vals = v_cache.data<T>();
    const int64_t head_stride = k_cache.strides[0], pos_stride = k_cache.strides[1];
    const bool widened = M >= kWidenFrom && dtype != DType::F16 && d % kLanes == 0;
    // The calling thread's buffers, kept between calls: fresh large allocations would fault their
    // pages in at every layer of every prefill.
    thread_local std::vector<WidenedHead> heads;
    if (widened && static_cast<int64_t>(heads.size()) < H_kv) heads.resize(H_kv);
    WidenedHead* widened_heads = heads.data();
#pragma omp parallel
    {
        if (widened) {
#pragma omp for schedule(static)
            for (int64_t kv = 0; kv < H_kv; ++kv)
                widen_head(widened_heads[kv], keys + kv * head_stride, vals + kv * head_stride, n_past + M, d, pos_stride, dtype);
        }
        std::vector<float> scores(n_past + M + kLanes), qs, acc(d);
#pragma omp for schedule(static) collapse(2)
        for (int64_t h = 0; h < H; ++h) {
            for (int64_t m = 0; m < M; ++m) {
                const float* qr = row_f32(q, m * H + h, qs);
                const int64_t n_keys = n_past + m + 1;  // causal: up to its own position
                if (widened) {
                    const WidenedHead& head = widened_heads[kv_head_of[h]];
                    attend_query(n_keys, scale, scores,
                                 [&](int64_t n, float* s) { widened_scores(qr, head, d, n, s); },
                                 [&](int64_t n, const float* w) { widened_values(head, d, n, w, acc.data()); });
                } else {
                    const T* kh = keys + kv_head_of[h] * head_stride;
                    const T* vh = vals + kv_head_of[h] * head_stride;
                    attend_query(n_keys, scale, scores,
                                 [&](int64_t n, float* s) {
                                     for (int64_t j = 0; j < n; ++j) s[j] = dot(qr, kh + j * pos_stride, d, dtype);
                                 },
                                 [&](int64_t n, const float* w) {
                                     std::fill(acc.begin(), acc.end(), 0.0f);
                                     for (int64_t j = 0; j < n; ++j) axpy(acc.data(), w[j], vh + j * pos_stride, d, dtype);
                                 });
                }
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
