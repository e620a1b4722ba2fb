#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {

void add(Tensor& out, const Tensor& a, const Tensor& b) {
    elementwise(out, a, b, "add", [](float x, float y) { return x + y; });
}

}  // namespace llaisys::ops
