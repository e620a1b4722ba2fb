#include <cmath>

#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {

void swiglu(Tensor& out, const Tensor& gate, const Tensor& up) {
    int64_t dim = out.size(-1);
    check_rows(out, dim, "swiglu out");
    check_rows(gate, dim, "swiglu gate");
    check_rows(up, dim, "swiglu up");
    LLAISYS_CHECK(n_rows(gate) == n_rows(out) && n_rows(up) == n_rows(out), "swiglu: row counts differ");
    std::vector<float> gs, us, y(dim);
    for (int64_t r = 0; r < n_rows(out); ++r) {
        const float* g = row_f32(gate, r, gs);
        const float* u = row_f32(up, r, us);
        for (int64_t i = 0; i < dim; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
        store_row(out, r, y.data());
    }
}

}  // namespace llaisys::ops
