#include <cstring>

#include "../ops.hpp"
#include "../quant.hpp"
#include "rows.hpp"

namespace llaisys::ops {

void embedding(Tensor& out, const Tensor& ids, const Tensor& table, int64_t vocab_begin) {
    LLAISYS_CHECK(ids.ndim() == 1 && ids.is_contiguous(), "embedding: ids must be a contiguous vector");
    LLAISYS_CHECK(ids.dtype == DType::I32 || ids.dtype == DType::I64, "embedding: ids must be integers");
    LLAISYS_CHECK(table.ndim() == 2 && table.strides[1] == 1, "embedding: table must be a matrix with contiguous rows");
    int64_t dim = table.size(1);
    check_rows(out, dim, "embedding out");
    LLAISYS_CHECK(n_rows(out) == ids.numel(), "embedding: one output row per id");
    std::vector<float> row(dim);
    for (int64_t m = 0; m < ids.numel(); ++m) {
        int64_t id = ids.dtype == DType::I32 ? ids.data<int32_t>()[m] : ids.data<int64_t>()[m];
        int64_t local = id - vocab_begin;
        if (local >= 0 && local < table.size(0)) {
            quant::dequantize_row(table.dtype, table.row(local), row.data(), dim);
        } else {
            std::fill(row.begin(), row.end(), 0.0f);
        }
        store_row(out, m, row.data());
    }
}

}  // namespace llaisys::ops
