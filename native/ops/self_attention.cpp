#include <algorithm>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <omp.h>
#include <utility>
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

// The sum of a vector's lanes by folding halves: lane l + lane l + kLanes/2, then the same on the
// first half, down to one. group_scores_of_block() makes this order for kLanes keys at once with a
// few shuffles, where adding the lanes one after another cost a chain of kLanes dependent adds per key.
inline float fold_lanes(f32xL v) {
    for (int width = kLanes / 2; width >= 1; width /= 2)
        for (int lane = 0; lane < width; ++lane) v[lane] = v[lane] + v[lane + width];
    return v[0];
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
        total = fold_lanes(acc);
    }
    for (; i < d; ++i) total += q[i] * widen(k[i], dtype);
    return total;
}

// Two vectors of keys' partial sums folded once: the low halves of each key's lanes plus the high
// halves. Keys hold 2 * width lanes of a then of b; lane i of the result is lane i % width of key
// i / width's low half (plus its high half's), so the keys stay in order.
template <int width, size_t... I>
inline f32xL fold_pair(f32xL a, f32xL b, std::index_sequence<I...>) {
    return __builtin_shufflevector(a, b, (I / width * 2 * width + I % width)...) +
           __builtin_shufflevector(a, b, (I / width * 2 * width + I % width + width)...);
}

// Folds `count` vectors (keys in order) at width, then the results at width / 2, down to one
// vector whose lane j is key j's fold_lanes().
template <int width>
inline f32xL fold_keys(f32xL* v, int count) {
    for (int j = 0; j < count / 2; ++j) v[j] = fold_pair<width>(v[2 * j], v[2 * j + 1], std::make_index_sequence<kLanes>{});
    if constexpr (width == 1) return v[0];
    else return fold_keys<width / 2>(v, count / 2);
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
// of the kLanes partial sums takes dimensions l, l + kLanes, ..., then the lanes fold in halves),
// kLanes keys at a time, so the results are bit-identical to it.
inline void widened_scores(const float* q, const WidenedHead& head, int64_t d, int64_t n_keys, float* scores) {
    for (int64_t b = 0; b * kLanes < n_keys; ++b) {
        const f32xL* keys = head.keys.data() + b * d;
        f32xL partial[kLanes] = {};
        for (int64_t i = 0; i < d; i += kLanes)
            for (int lane = 0; lane < kLanes; ++lane) partial[lane] = fused(splat(q[i + lane]), keys[i + lane], partial[lane]);
        for (int width = kLanes / 2; width >= 1; width /= 2)  // dot()'s fold_lanes order
            for (int lane = 0; lane < width; ++lane) partial[lane] = partial[lane] + partial[lane + width];
        const f32xL total = partial[0];
        const int64_t n = std::min<int64_t>(kLanes, n_keys - b * kLanes);
        for (int64_t j = 0; j < n; ++j) scores[b * kLanes + j] = total[j];
    }
}

// acc[0, V * kLanes) = sum_j weights[j] v_j for the values v, v + pos_stride, ..., in axpy()'s
// operations and order. V is a constant so that the V sums stay in registers over all keys.
template <int V, class T>
inline void weighted_chunk(const T* v, int64_t pos_stride, int64_t n_keys, const float* weights, float* acc) {
    f32xL a[V] = {};
    for (int64_t j = 0; j < n_keys; ++j) {
        const f32xL w = splat(weights[j]);
        for (int x = 0; x < V; ++x) a[x] = fused(w, load_lanes(v + j * pos_stride + x * kLanes), a[x]);
    }
    std::memcpy(acc, a, sizeof a);
}

// The same over d (whole vectors) values of a widened head. (axpy's load and store of acc per key
// chained every key to the last through memory; a runtime count of sums left them on the stack.)
template <class T>
inline void weighted_values(const T* v, int64_t pos_stride, int64_t d, int64_t n_keys, const float* weights, float* acc) {
    constexpr int64_t kChunk = 8 * kLanes;
    for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
        const T* vc = v + c0;
        float* ac = acc + c0;
        switch (std::min(kChunk, d - c0) / kLanes) {
            case 1: weighted_chunk<1>(vc, pos_stride, n_keys, weights, ac); break;
            case 2: weighted_chunk<2>(vc, pos_stride, n_keys, weights, ac); break;
            case 3: weighted_chunk<3>(vc, pos_stride, n_keys, weights, ac); break;
            case 4: weighted_chunk<4>(vc, pos_stride, n_keys, weights, ac); break;
            case 5: weighted_chunk<5>(vc, pos_stride, n_keys, weights, ac); break;
            case 6: weighted_chunk<6>(vc, pos_stride, n_keys, weights, ac); break;
            case 7: weighted_chunk<7>(vc, pos_stride, n_keys, weights, ac); break;
            default: weighted_chunk<8>(vc, pos_stride, n_keys, weights, ac); break;
        }
    }
}

// ---- Decode: the query heads that share a key/value head read it once ----
//
// Qwen2's heads share key/value heads (0.5B: 7 query heads a key/value head). Read one query head at
// a time, each key and value is loaded and widened from bf16 once per query head; a group of G heads
// that share one loads it once for all G, which matters once the context is long (4000 tokens: the
// widening was most of attention's time). Each head's sums keep dot()'s and axpy()'s order, so the
// bits do not depend on the grouping.

// Up to this many heads a group: their V-vector value sums then fit the registers (G * V <= 16).
// Heads of more than kMaxGroupVectors vectors read the cache a query head at a time.
constexpr int kMaxGroupHeads = 4, kMaxGroupVectors = 8;

// One position's query heads that read the same key/value head.
struct HeadGroup {
    int64_t m, kv;
    int count;
    int64_t heads[kMaxGroupHeads];
};

// The groups for M positions: the query heads of each key/value head in order, cut into groups of
// up to `size`.
std::vector<HeadGroup> head_groups(int64_t M, int64_t H_kv, const std::vector<int64_t>& kv_head_of, int size) {
    std::vector<HeadGroup> groups;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t kv = 0; kv < H_kv; ++kv) {
            HeadGroup g{m, kv, 0, {}};
            for (int64_t h = 0; h < static_cast<int64_t>(kv_head_of.size()); ++h) {
                if (kv_head_of[h] != kv) continue;
                g.heads[g.count++] = h;
                if (g.count == size) {
                    groups.push_back(g);
                    g.count = 0;
                }
            }
            if (g.count > 0) groups.push_back(g);
        }
    return groups;
}

// Scores of G query heads (q[h]: V vectors each) against the kLanes keys k, k + pos_stride, ...:
// each head's dot() with each key, bit for bit, the keys loaded once for all G.
template <int V, int G, class T>
inline void group_scores_of_block(const f32xL (&q)[G][V], const T* k, int64_t pos_stride, float* const (&scores)[G]) {
    f32xL partial[G][kLanes];
    for (int j = 0; j < kLanes; ++j) {
        f32xL acc[G] = {};
        for (int x = 0; x < V; ++x) {
            const f32xL key = load_lanes(k + j * pos_stride + x * kLanes);
            for (int h = 0; h < G; ++h) acc[h] = fused(q[h][x], key, acc[h]);
        }
        for (int h = 0; h < G; ++h) partial[h][j] = acc[h];
    }
    for (int h = 0; h < G; ++h) {
        const f32xL total = fold_keys<kLanes / 2>(partial[h], kLanes);
        std::memcpy(scores[h], &total, sizeof total);
    }
}

// One group's attention over keys [0, n_keys) of the head at k, v; out[h] gets head h's result.
// `scores` holds G rows of `stride` floats.
template <int V, int G, class T>
void attend_group(const float* const (&q_rows)[G], const T* k, const T* v, int64_t pos_stride, DType dtype,
                  int64_t n_keys, float scale, float* scores, int64_t stride, float* const (&out)[G]) {
    constexpr int64_t d = V * kLanes;
    f32xL q[G][V];
    float* rows[G];
    for (int h = 0; h < G; ++h) {
        std::memcpy(q[h], q_rows[h], sizeof q[h]);
        rows[h] = scores + h * stride;
    }
    int64_t j = 0;
    for (; j + kLanes <= n_keys; j += kLanes) {
        float* block[G];
        for (int h = 0; h < G; ++h) block[h] = rows[h] + j;
        group_scores_of_block<V, G>(q, k + j * pos_stride, pos_stride, block);
    }
    for (; j < n_keys; ++j)
        for (int h = 0; h < G; ++h) rows[h][j] = dot(q_rows[h], k + j * pos_stride, d, dtype);
    for (int h = 0; h < G; ++h) softmax(rows[h], n_keys, scale);
    f32xL sums[G][V] = {};  // weighted_chunk()'s sums, for each head
    for (j = 0; j < n_keys; ++j) {
        f32xL w[G];
        for (int h = 0; h < G; ++h) w[h] = splat(rows[h][j]);
        for (int x = 0; x < V; ++x) {
            const f32xL value = load_lanes(v + j * pos_stride + x * kLanes);
            for (int h = 0; h < G; ++h) sums[h][x] = fused(w[h], value, sums[h][x]);
        }
    }
    for (int h = 0; h < G; ++h) std::memcpy(out[h], sums[h], sizeof sums[h]);
}

template <int V, class T>
void attend_group_of(int count, const float* const* q_rows, const T* k, const T* v, int64_t pos_stride, DType dtype,
                     int64_t n_keys, float scale, float* scores, int64_t stride, float* const* out) {
    const auto run = [&]<int G>() {
        const float* q[G];
        float* o[G];
        std::copy(q_rows, q_rows + G, q);
        std::copy(out, out + G, o);
        attend_group<V, G>(q, k, v, pos_stride, dtype, n_keys, scale, scores, stride, o);
    };
    switch (count) {
        case 1: return run.template operator()<1>();
        case 2: return run.template operator()<2>();
        case 3: return run.template operator()<3>();
        default: return run.template operator()<4>();
    }
}

// Decode's attention in head groups (see above), for d of 1 to kMaxGroupVectors vectors: enough groups for
// the threads (a head a group once there are more threads than heads), up to 16 / V heads each.
template <class T>
void attend_grouped(Tensor& out, const Tensor& q, const T* keys, const T* vals, int64_t head_stride, int64_t pos_stride,
                    DType dtype, int64_t H_kv, const std::vector<int64_t>& kv_head_of, int64_t n_past, float scale) {
    const int64_t M = q.size(0), H = q.size(1), d = q.size(2);
    const int V = static_cast<int>(d / kLanes);
    const int64_t heads_per_kv = (H + H_kv - 1) / H_kv;
    const int64_t groups_per_kv = std::max<int64_t>(1, (omp_get_max_threads() + M * H_kv - 1) / (M * H_kv));
    const int size = static_cast<int>(std::clamp<int64_t>((heads_per_kv + groups_per_kv - 1) / groups_per_kv, 1,
                                                          std::min(kMaxGroupHeads, 16 / V)));
    const std::vector<HeadGroup> groups = head_groups(M, H_kv, kv_head_of, size);
    const int64_t stride = n_past + M + kLanes;  // room for whole vectors of scores
#pragma omp parallel
    {
        std::vector<float> scores(size * stride), results(kMaxGroupHeads * d);
        std::vector<float> scratch[kMaxGroupHeads];
#pragma omp for schedule(static)
        for (size_t u = 0; u < groups.size(); ++u) {
            const HeadGroup& g = groups[u];
            const float* q_rows[kMaxGroupHeads];
            float* out_rows[kMaxGroupHeads];
            for (int i = 0; i < g.count; ++i) {
                q_rows[i] = row_f32(q, g.m * H + g.heads[i], scratch[i]);
                out_rows[i] = results.data() + i * d;
            }
            const T* k = keys + g.kv * head_stride;
            const T* v = vals + g.kv * head_stride;
            const int64_t n_keys = n_past + g.m + 1;  // causal: up to its own position
            const auto run = [&]<int Vs>() {
                attend_group_of<Vs>(g.count, q_rows, k, v, pos_stride, dtype, n_keys, scale, scores.data(), stride, out_rows);
            };
            switch (V) {
                case 1: run.template operator()<1>(); break;
                case 2: run.template operator()<2>(); break;
                case 3: run.template operator()<3>(); break;
                case 4: run.template operator()<4>(); break;
                case 5: run.template operator()<5>(); break;
                case 6: run.template operator()<6>(); break;
                case 7: run.template operator()<7>(); break;
                default: run.template operator()<8>(); break;
            }
            for (int i = 0; i < g.count; ++i) store_row(out, g.m * H + g.heads[i], out_rows[i]);
        }
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
    if (!widened && dtype != DType::F16 && d % kLanes == 0 && d <= kMaxGroupVectors * kLanes)
        return attend_grouped(out, q, keys, vals, head_stride, pos_stride, dtype, H_kv, kv_head_of, n_past, scale);
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
                                 [&](int64_t n, const float* w) { weighted_values(head.values.data(), d, d, n, w, acc.data()); });
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
    if (q.size(1) == 0) return;  // a rank of more ranks than heads holds none
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
