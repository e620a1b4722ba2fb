#include <cmath>

#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {

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
            float sum_sq = 0.0f;
            for (int64_t i = 0; i < dim; ++i) sum_sq += xr[i] * xr[i];
            float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(dim) + eps);
            for (int64_t i = 0; i < dim; ++i) y[i] = xr[i] * inv_rms * w[i];
            store_row(out, r, y.data());
        }
    }
}

}  // namespace llaisys::ops
