#include <cmath>

#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {

void rope(Tensor& out, const Tensor& x, const Tensor& positions, float theta) {
    LLAISYS_CHECK(x.ndim() == 3 && out.shape == x.shape, "rope: x and out must be [M, H, head_dim]");
    int64_t head_dim = x.size(2), half = head_dim / 2;
    LLAISYS_CHECK(head_dim % 2 == 0, "rope: head_dim must be even");
    check_rows(x, head_dim, "rope x");
    check_rows(out, head_dim, "rope out");
    LLAISYS_CHECK(positions.dtype == DType::I64 && positions.ndim() == 1 && positions.size(0) == x.size(0),
                  "rope: positions must be [M] i64");
    // Frequencies as transformers computes them (f32 powers), so that f32 runs compare tightly.
    std::vector<float> inv_freq(half), cos_(half), sin_(half), xs, y(head_dim);
    for (int64_t i = 0; i < half; ++i)
        inv_freq[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
    int64_t n_head = x.size(1);
    for (int64_t m = 0; m < x.size(0); ++m) {
        float pos = static_cast<float>(positions.data<int64_t>()[m]);
        for (int64_t i = 0; i < half; ++i) {
            float angle = pos * inv_freq[i];
            cos_[i] = std::cos(angle);
            sin_[i] = std::sin(angle);
        }
        for (int64_t h = 0; h < n_head; ++h) {
            const float* xr = row_f32(x, m * n_head + h, xs);
            for (int64_t i = 0; i < half; ++i) {
                float x0 = xr[i], x1 = xr[i + half];
                y[i] = x0 * cos_[i] - x1 * sin_[i];
                y[i + half] = x1 * cos_[i] + x0 * sin_[i];
            }
            store_row(out, m * n_head + h, y.data());
        }
    }
}

}  // namespace llaisys::ops
