#include <cmath>
#include <limits>

#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {

std::pair<float, int64_t> argmax(const Tensor& x) {
    LLAISYS_CHECK(x.ndim() == 1 && x.size(0) > 0, "argmax: x must be a non-empty vector");
    check_rows(x, x.size(0), "argmax x");
    std::vector<float> scratch;
    const float* v = row_f32(x, 0, scratch);
    float best = -std::numeric_limits<float>::infinity();
    int64_t best_index = 0;
    for (int64_t i = 0; i < x.size(0); ++i) {
        if (v[i] > best) {  // strict: ties keep the lower index; NaN never wins
            best = v[i];
            best_index = i;
        }
    }
    return {best, best_index};
}

}  // namespace llaisys::ops
