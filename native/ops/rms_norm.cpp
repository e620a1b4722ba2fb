#include <cmath>

#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {
namespace {

// x[0]^2 + ... + x[n-1]^2 in 16 interleaved partial sums (element i goes to sum i % 16), folded in
// halves at the end. One running sum was a chain of dependent adds, 3 us of each decode step's
// norm at 896 values; a fixed count of 16 (not the register width) keeps the bits the same on
// AVX2 and AVX-512 builds.
float sum_of_squares(const float* x, int64_t n) {
    constexpr int kSums = 16;
    float sums[kSums] = {};
    int64_t i = 0;
    for (; i + kSums <= n; i += kSums)
        for (int l = 0; l < kSums; ++l) sums[l] += x[i + l] * x[i + l];
    for (int l = 0; i + l < n; ++l) sums[l] += x[i + l] * x[i + l];
    for (int width = kSums / 2; width >= 1; width /= 2)
        for (int l = 0; l < width; ++l) sums[l] += sums[l + width];
    return sums[0];
}

}  // namespace

void rms_norm(Tensor& out, const Tensor& x, const Tensor& weight, float eps) {
    int64_t dim = x.size(-1);
    check_rows(x, dim, "rms_norm x");
    check_rows(out, dim, "rms_norm out");
    LLAISYS_CHECK(weight.ndim() == 1 && weight.size(0) == dim && weight.is_contiguous(), "rms_norm: weight must be [dim]");
    LLAISYS_CHECK(n_rows(out) == n_rows(x), "rms_norm: out and x differ in rows");
    std::vector<float> w_scratch;
    Tensor w2 = weight.view({1, dim});
    const float* w = row_f32(w2, 0, w_scratch);
    const int64_t rows = n_rows(x);
#pragma omp parallel if (rows >= kParallelRows)
    {
        std::vector<float> x_scratch, y(dim);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const float* xr = row_f32(x, r, x_scratch);
            const float sum_sq = sum_of_squares(xr, dim);
            float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(dim) + eps);
            for (int64_t i = 0; i < dim; ++i) y[i] = xr[i] * inv_rms * w[i];
            store_row(out, r, y.data());
        }
    }
}

}  // namespace llaisys::ops
