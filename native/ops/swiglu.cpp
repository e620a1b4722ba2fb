// SwiGLU, out = silu(gate) * up: the MLP's activation. A prompt runs it over [tokens, MLP width],
// as many values as a projection has outputs, so it runs kLanes at a time; a partial last vector is
// padded (not finished in scalar code), so a value's bits depend on its inputs only: not on its
// column, the row length or the rank count.
#include <algorithm>
#include <cstring>

#include "../ops.hpp"
#include "lanes.hpp"
#include "rows.hpp"

namespace llaisys::ops {

void swiglu(Tensor& out, const Tensor& gate, const Tensor& up) {
    elementwise(out, gate, up, "swiglu", [](const float* g, const float* u, float* y, int64_t n) {
        for (int64_t i = 0; i < n; i += kLanes) {
            const size_t bytes = std::min<int64_t>(kLanes, n - i) * sizeof(float);
            f32xL gv = {}, uv = {};
            std::memcpy(&gv, g + i, bytes);
            std::memcpy(&uv, u + i, bytes);
            const f32xL yv = gv / (1.0f + exp_lanes(-gv)) * uv;
            std::memcpy(y + i, &yv, bytes);
        }
    });
}

}  // namespace llaisys::ops
