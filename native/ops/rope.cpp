#include <cmath>

#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {

void rope_angles(Tensor& out, const Tensor& positions, float theta) {
    LLAISYS_CHECK(positions.dtype == DType::I64 && positions.ndim() == 1, "rope_angles: positions must be [M] i64");
    LLAISYS_CHECK(out.dtype == DType::F32 && out.ndim() == 2 && out.size(0) == positions.size(0) && out.is_contiguous(),
                  "rope_angles: out must be contiguous [M, head_dim] f32");
    const int64_t head_dim = out.size(1), half = head_dim / 2;
    LLAISYS_CHECK(head_dim % 2 == 0, "rope_angles: head_dim must be even");
    // Frequencies as transformers computes them (f32 powers), so that f32 runs compare tightly.
    std::vector<float> inv_freq(half);
    for (int64_t i = 0; i < half; ++i)
        inv_freq[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
    for (int64_t m = 0; m < positions.size(0); ++m) {
        const float pos = static_cast<float>(positions.data<int64_t>()[m]);
        float* row = out.data<float>() + m * head_dim;
        for (int64_t i = 0; i < half; ++i) {
            const float angle = pos * inv_freq[i];
            row[i] = std::cos(angle);
            row[half + i] = std::sin(angle);
        }
    }
}

void rope(Tensor& out, const Tensor& x, const Tensor& angles) {
    LLAISYS_CHECK(x.ndim() == 3 && out.shape == x.shape, "rope: x and out must be [M, H, head_dim]");
    const int64_t head_dim = x.size(2), half = head_dim / 2;
    check_rows(x, head_dim, "rope x");
    check_rows(out, head_dim, "rope out");
    const bool angles_fit = angles.ndim() == 2 && angles.size(0) == x.size(0) && angles.size(1) == head_dim;
    LLAISYS_CHECK(angles.dtype == DType::F32 && angles.is_contiguous() && angles_fit,
                  "rope: angles must be rope_angles() of x's positions");
    std::vector<float> xs, y(head_dim);
    const int64_t n_head = x.size(1);
    for (int64_t m = 0; m < x.size(0); ++m) {
        const float* cos_ = angles.data<float>() + m * head_dim;
        const float* sin_ = cos_ + half;
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
