#include <algorithm>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <omp.h>

#include "../ops.hpp"
#include "lanes.hpp"
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

// The same 32 bits as philox() for the kRaceTokens tokens token0, token0 + 1, ... at once. Each
// 64-bit lane holds a 32-bit word, so one multiply gives a round's whole 64-bit product; four
// registers of 8 lanes go through the rounds side by side, so that their chains of multiplies overlap.
typedef uint64_t u64x8 __attribute__((vector_size(64)));
constexpr int kRaceRegisters = 4, kRaceTokens = 8 * kRaceRegisters;

// Each lane's low 32 bits times m, as a 64-bit product. One vpmuludq with AVX-512: GCC's own 64-bit
// multiply (vpmullq, latency 15 to its 5) made the rounds' chain the cost of the whole race.
inline u64x8 times32(u64x8 a, uint32_t m) {
#if defined(__AVX512F__)
    return (u64x8)_mm512_mul_epu32((__m512i)a, _mm512_set1_epi64(m));
#else
    return a * m;
#endif
}

void philox_race(uint64_t seed, uint64_t step, int64_t token0, uint64_t out[kRaceTokens]) {
    constexpr uint64_t kLow = 0xFFFFFFFFu;
    const u64x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    u64x8 c0[kRaceRegisters], c1[kRaceRegisters], c2[kRaceRegisters], c3[kRaceRegisters];
    for (int g = 0; g < kRaceRegisters; ++g) {
        const u64x8 id = lane + static_cast<uint64_t>(token0 + 8 * g);
        c0[g] = id & kLow;
        c1[g] = id >> 32;
        c2[g] = u64x8{} + (step & kLow);
        c3[g] = u64x8{} + (step >> 32);
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        for (int g = 0; g < kRaceRegisters; ++g) {
            const u64x8 p0 = times32(c0[g], 0xD2511F53u), p1 = times32(c2[g], 0xCD9E8D57u);
            c0[g] = (p1 >> 32) ^ c1[g] ^ k0;
            c1[g] = p1 & kLow;
            c2[g] = (p0 >> 32) ^ c3[g] ^ k1;
            c3[g] = p0 & kLow;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    std::memcpy(out, c0, sizeof c0);  // each lane's low 32 bits: philox()'s result
}

// The noise of a draw r: u = (r + 1/2) / 2^32 lies in [1.2e-10, 1 - 1.2e-10], so the noise lies
// in [-3.14, 22.88].
float noise_of(uint32_t r) {
    const double u = (static_cast<double>(r) + 0.5) / 4294967296.0;
    return static_cast<float>(-std::log(-std::log(u)));
}

// A token's score in the race. Out of line, so that every caller rounds the same two steps (the
// product was rounded before the call): a token's score cannot depend on which path or rank made it.
[[gnu::noinline]] float race_score(float scaled, uint32_t r) { return scaled + noise_of(r); }

// The largest noise of the draws whose top kBoundBits bits are b, for each b (the noise grows with
// r), a little over: a token whose scaled logit plus its bucket's bound falls short of the best
// score so far cannot win, and its two logarithms are never taken.
constexpr int kBoundBits = 12;

const std::vector<float>& noise_bounds() {
    static const std::vector<float> bounds = [] {
        std::vector<float> b(1 << kBoundBits);
        for (uint32_t i = 0; i < b.size(); ++i) {
            const uint32_t last = ((i + 1) << (32 - kBoundBits)) - 1;  // wraps to 2^32 - 1 for the top bucket
            b[i] = noise_of(last) * (1.0f + 1e-5f) + 1e-5f;
        }
        return b;
    }();
    return bounds;
}

// The race over tokens [begin, end) (whole blocks but the last) from a best score and its index:
// the new best and its index.
std::pair<float, int64_t> race(const float* v, int64_t begin, int64_t end, float inv_temperature, uint64_t seed,
                               uint64_t step, int64_t id_offset, std::pair<float, int64_t> start) {
    auto [best, best_index] = start;
    const std::vector<float>& bounds = noise_bounds();
    const float widest = bounds.back();
    for (int64_t i0 = begin; i0 < end; i0 += kRaceTokens) {
        const int count = static_cast<int>(std::min<int64_t>(kRaceTokens, end - i0));
        alignas(64) float scaled[kRaceTokens];
        bool contender = false;  // whether any of them could win with the largest noise
        if (count == kRaceTokens) {
            for (int c = 0; c < kRaceTokens; c += kLanes) {
                f32xL chunk;
                std::memcpy(&chunk, v + i0 + c, sizeof chunk);
                chunk *= inv_temperature;
                std::memcpy(scaled + c, &chunk, sizeof chunk);
                contender |= any_at_least(chunk + widest, best);
            }
        } else {
            for (int l = 0; l < count; ++l) {
                scaled[l] = v[i0 + l] * inv_temperature;
                contender |= scaled[l] + widest >= best;
            }
        }
        if (!contender) continue;  // no draws
        uint64_t draws[kRaceTokens];
        philox_race(seed, step, id_offset + i0, draws);
        for (int l = 0; l < count; ++l) {
            const uint32_t draw = static_cast<uint32_t>(draws[l]);
            if (!(scaled[l] + bounds[draw >> (32 - kBoundBits)] >= best)) continue;  // also skips NaN
            const float score = race_score(scaled[l], draw);
            if (score > best || (score == best && i0 + l < best_index)) {
                best = score;
                best_index = i0 + l;
            }
        }
    }
    return {best, best_index};
}

// From this many logits on, threads share the race (a 150k vocabulary took 0.4 ms on one).
constexpr int64_t kParallelRace = 1 << 15;

}  // namespace

float gumbel_noise(uint64_t seed, uint64_t step, int64_t token_id) { return noise_of(philox(seed, step, token_id)); }

std::vector<float> gumbel_noise(uint64_t seed, uint64_t step, const std::vector<int64_t>& token_ids) {
    std::vector<float> noise;
    noise.reserve(token_ids.size());
    for (int64_t id : token_ids) noise.push_back(gumbel_noise(seed, step, id));
    return noise;
}

// argmax over i of x_i / T + noise(seed, step, id_offset + i), ties to the lowest index, NaNs
// never winning. The race starts from the largest scaled logit's score; then kRaceTokens tokens at a
// time draw their bits (philox_race), and only a token whose bucket bound could beat the best score so far
// takes its logarithms: at T = 1 on real logits nearly every token lies within the noise's span of
// the best, and the logarithms of all 150k took 4.7 ms a step.
std::pair<float, int64_t> gumbel_argmax(const Tensor& x, float inv_temperature, uint64_t seed, uint64_t step,
                                        int64_t id_offset) {
    LLAISYS_CHECK(x.ndim() == 1 && x.size(0) > 0, "gumbel_argmax: x must be a non-empty vector");
    LLAISYS_CHECK(inv_temperature > 0.0f, "gumbel_argmax: temperature must be positive");
    std::vector<float> scratch;
    const float* v = row_f32(x, 0, scratch);
    const int64_t n = x.size(0);
    constexpr float kLowest = -std::numeric_limits<float>::infinity();
    const float top = largest_scaled(v, n, inv_temperature);
    if (!(top > kLowest)) return {kLowest, id_offset};  // nothing above -inf: no token can win
    int64_t best_index = 0;
    while (!(v[best_index] * inv_temperature == top)) ++best_index;
    float best = race_score(top, philox(seed, step, id_offset + best_index));
    // Threads race over contiguous ranges of whole blocks from the same start; the winner is the
    // same however the range is cut (the best score, ties to the lowest index).
    std::vector<std::pair<float, int64_t>> results(omp_get_max_threads(), {best, best_index});
#pragma omp parallel if (n >= kParallelRace)
    {
        const int64_t blocks = (n + kRaceTokens - 1) / kRaceTokens, t = omp_get_thread_num(), threads = omp_get_num_threads();
        const int64_t begin = blocks * t / threads * kRaceTokens, end = std::min(n, blocks * (t + 1) / threads * kRaceTokens);
        results[t] = race(v, begin, end, inv_temperature, seed, step, id_offset, results[t]);
    }
    for (const auto& [score, index] : results)
        if (score > best || (score == best && index < best_index)) {
            best = score;
            best_index = index;
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
