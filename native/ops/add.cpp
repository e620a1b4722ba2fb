#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {

void add(Tensor& out, const Tensor& a, const Tensor& b) {
    elementwise(out, a, b, "add", [](const float* x, const float* y, float* sum, int64_t n) {
        for (int64_t i = 0; i < n; ++i) sum[i] = x[i] + y[i];
    });
}

}  // namespace llaisys::ops
