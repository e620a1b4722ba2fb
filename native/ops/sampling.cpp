#include <algorithm>
#include <cmath>
#include <limits>

#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {
namespace {

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"): a keyed bijection
// of a 128-bit counter, so any (seed, step, token) draws its number without a sequential state.
uint32_t philox(uint64_t seed, uint64_t step, int64_t token_id) {
    uint32_t c[4] = {static_cast<uint32_t>(token_id), static_cast<uint32_t>(static_cast<uint64_t>(token_id) >> 32),
                     static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32)};
    uint32_t k[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
    for (int round = 0; round < 10; ++round) {
        uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c[0];
        uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
        uint32_t next[4] = {static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k[0], static_cast<uint32_t>(p1),
                            static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k[1], static_cast<uint32_t>(p0)};
        std::copy(next, next + 4, c);
        k[0] += 0x9E3779B9u;
        k[1] += 0xBB67AE85u;
    }
    return c[0];
}

// u = (r + 1/2) / 2^32 lies in [1.2e-10, 1 - 1.2e-10], so the noise lies in [-3.14, 22.88]:
// a token whose scaled logit is this far below the largest can never win the race.
constexpr float kNoiseSpan = 26.1f;

}  // namespace

float gumbel_noise(uint64_t seed, uint64_t step, int64_t token_id) {
    double u = (static_cast<double>(philox(seed, step, token_id)) + 0.5) / 4294967296.0;
    return static_cast<float>(-std::log(-std::log(u)));
}

std::vector<float> gumbel_noise(uint64_t seed, uint64_t step, const std::vector<int64_t>& token_ids) {
    std::vector<float> noise;
    noise.reserve(token_ids.size());
    for (int64_t id : token_ids) noise.push_back(gumbel_noise(seed, step, id));
    return noise;
}

std::pair<float, int64_t> gumbel_argmax(const Tensor& x, float inv_temperature, uint64_t seed, uint64_t step,
                                        int64_t id_offset) {
    LLAISYS_CHECK(x.ndim() == 1 && x.size(0) > 0, "gumbel_argmax: x must be a non-empty vector");
    LLAISYS_CHECK(inv_temperature > 0.0f, "gumbel_argmax: temperature must be positive");
    std::vector<float> scratch;
    const float* v = row_f32(x, 0, scratch);
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < x.size(0); ++i) top = std::max(top, v[i] * inv_temperature);
    float best = -std::numeric_limits<float>::infinity();
    int64_t best_index = 0;
    for (int64_t i = 0; i < x.size(0); ++i) {
        float scaled = v[i] * inv_temperature;
        if (!(scaled >= top - kNoiseSpan)) continue;  // cannot win (also skips NaN)
        float score = scaled + gumbel_noise(seed, step, id_offset + i);
        if (score > best) {
            best = score;
            best_index = i;
        }
    }
    return {best, id_offset + best_index};
}

std::pair<std::vector<float>, std::vector<int64_t>> top_k(const Tensor& x, int64_t k) {
    LLAISYS_CHECK(x.ndim() == 1 && k > 0, "top_k: x must be a vector and k positive");
    std::vector<float> scratch;
    const float* v = row_f32(x, 0, scratch);
    using Entry = std::pair<float, int64_t>;
    // "a before b" when a ranks higher: larger value, then lower index.
    auto higher = [](const Entry& a, const Entry& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
    std::vector<Entry> heap;  // the k best so far, worst on top
    heap.reserve(k);
    for (int64_t i = 0; i < x.size(0); ++i) {
        if (std::isnan(v[i])) continue;
        Entry e{v[i], i};
        if (static_cast<int64_t>(heap.size()) < k) {
            heap.push_back(e);
            std::push_heap(heap.begin(), heap.end(), higher);
        } else if (higher(e, heap.front())) {
            std::pop_heap(heap.begin(), heap.end(), higher);
            heap.back() = e;
            std::push_heap(heap.begin(), heap.end(), higher);
        }
    }
    std::sort(heap.begin(), heap.end(), higher);
    std::vector<float> values;
    std::vector<int64_t> indices;
    for (const Entry& e : heap) {
        values.push_back(e.first);
        indices.push_back(e.second);
    }
    return {values, indices};
}

}  // namespace llaisys::ops
