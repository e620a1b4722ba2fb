#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {

void add(Tensor& out, const Tensor& a, const Tensor& b) {
    int64_t dim = out.size(-1);
    check_rows(out, dim, "add out");
    check_rows(a, dim, "add a");
    check_rows(b, dim, "add b");
    LLAISYS_CHECK(n_rows(a) == n_rows(out) && n_rows(b) == n_rows(out), "add: row counts differ");
    std::vector<float> as, bs, y(dim);
    for (int64_t r = 0; r < n_rows(out); ++r) {
        const float* ar = row_f32(a, r, as);
        const float* br = row_f32(b, r, bs);
        for (int64_t i = 0; i < dim; ++i) y[i] = ar[i] + br[i];
        store_row(out, r, y.data());
    }
}

}  // namespace llaisys::ops
