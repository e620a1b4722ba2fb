#include <cmath>

#include "../ops.hpp"
#include "rows.hpp"

namespace llaisys::ops {

void swiglu(Tensor& out, const Tensor& gate, const Tensor& up) {
    elementwise(out, gate, up, "swiglu", [](float g, float u) { return g / (1.0f + std::exp(-g)) * u; });
}

}  // namespace llaisys::ops
