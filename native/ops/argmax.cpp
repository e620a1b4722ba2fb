#include <cmath>
#include <limits>

#include "../ops.hpp"
#include "lanes.hpp"
#include "rows.hpp"

namespace llaisys::ops {

// Two passes over a row of logits (150k for Qwen2's vocabulary, so it stays in cache): the maximum,
// kLanes at a time, then the first index that holds it. The scalar loop with its branch per value
// took more than 1% of a decode step at one thread.
std::pair<float, int64_t> argmax(const Tensor& x) {
    LLAISYS_CHECK(x.ndim() == 1 && x.size(0) > 0, "argmax: x must be a non-empty vector");
    check_rows(x, x.size(0), "argmax x");
    std::vector<float> scratch;
    const float* v = row_f32(x, 0, scratch);
    const int64_t n = x.size(0);
    constexpr float kLowest = -std::numeric_limits<float>::infinity();
    const float best = largest_scaled(v, n, 1.0f);
    if (!(best > kLowest)) return {kLowest, 0};  // no value above -inf: index 0, as a strict scan gives
    int64_t first = 0;
    while (v[first] != best) ++first;  // ties keep the lower index
    return {best, first};
}

}  // namespace llaisys::ops
