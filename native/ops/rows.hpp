// Row access shared by the elementwise ops: a tensor is seen as rows along its last dimension,
// which must be contiguous; leading dimensions may have any strides (views of fused outputs).
#pragma once

#include <algorithm>
#include <omp.h>
#include <vector>

#include "../tensor.hpp"

namespace llaisys::ops {

// Row counts from which the per-row ops split their rows over threads (one decode row is too
// little work to wake them).
constexpr int64_t kParallelRows = 4;
// Row length from which the elementwise ops split fewer rows than that into column spans.
constexpr int64_t kParallelColumns = 2048;

inline int64_t n_rows(const Tensor& t) {
    int64_t rows = 1;
    for (int64_t d = 0; d + 1 < t.ndim(); ++d) rows *= t.shape[d];
    return rows;
}

// Address of row r, unravelling r over the leading dimensions.
inline std::byte* row_ptr(const Tensor& t, int64_t r) {
    int64_t offset = 0;
    for (int64_t d = t.ndim() - 2; d >= 0; --d) {
        offset += (r % t.shape[d]) * t.strides[d];
        r /= t.shape[d];
    }
    return t.base + offset * static_cast<int64_t>(block_bytes(t.dtype));
}

inline void check_rows(const Tensor& t, int64_t cols, const char* what) {
    LLAISYS_CHECK(t.ndim() >= 1 && t.strides.back() == 1, std::string(what) + ": last dimension must be contiguous");
    LLAISYS_CHECK(t.size(-1) == cols, std::string(what) + ": last dimension has the wrong size");
}

// The row as f32: in place when the tensor is f32, else converted into `scratch`.
inline const float* row_f32(const Tensor& t, int64_t r, std::vector<float>& scratch) {
    const std::byte* p = row_ptr(t, r);
    if (t.dtype == DType::F32) return reinterpret_cast<const float*>(p);
    scratch.resize(t.size(-1));
    to_f32(scratch.data(), p, t.dtype, t.size(-1));
    return scratch.data();
}

inline void store_row(const Tensor& t, int64_t r, const float* values) {
    from_f32(row_ptr(t, r), t.dtype, values, t.size(-1));
}

// The elementwise binary ops over rows of equal length, in f32: f(a_row, b_row, out_row, n) computes
// out[r][i] from a[r][i] and b[r][i] alone, for i < n.
template <class F>
void elementwise(Tensor& out, const Tensor& a, const Tensor& b, const char* name, F f) {
    int64_t dim = out.size(-1);
    check_rows(out, dim, name);
    check_rows(a, dim, name);
    check_rows(b, dim, name);
    LLAISYS_CHECK(n_rows(a) == n_rows(out) && n_rows(b) == n_rows(out), std::string(name) + ": row counts differ");
    // Rows split over the threads in prefill: run serially, these ops held the other threads
    // waiting at the next matrix product. A few long f32 rows (decode's SwiGLU, 4864 values) split
    // into column spans of whole vectors instead. Each element is computed alone, so neither split
    // changes anything.
    const int64_t rows = n_rows(out);
    const bool f32 = out.dtype == DType::F32 && a.dtype == DType::F32 && b.dtype == DType::F32;
    const bool spans = rows < kParallelRows && f32 && dim >= kParallelColumns;
    const int64_t span = spans ? (dim / omp_get_max_threads() + 63) / 64 * 64 : std::max<int64_t>(dim, 1);
    const int64_t per_row = (dim + span - 1) / span;  // 0 for empty rows (a rank without MLP columns)
#pragma omp parallel if (rows >= kParallelRows || per_row > 1)
    {
        std::vector<float> as, bs, y(dim);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < rows * per_row; ++item) {
            const int64_t r = item / per_row, c0 = item % per_row * span;
            if (spans) {
                f(reinterpret_cast<const float*>(row_ptr(a, r)) + c0, reinterpret_cast<const float*>(row_ptr(b, r)) + c0,
                  reinterpret_cast<float*>(row_ptr(out, r)) + c0, std::min(span, dim - c0));
                continue;
            }
            const float* ar = row_f32(a, r, as);
            const float* br = row_f32(b, r, bs);
            f(ar, br, y.data(), dim);
            store_row(out, r, y.data());
        }
    }
}

}  // namespace llaisys::ops
