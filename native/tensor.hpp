// A plain strided tensor: dtype, shape, strides and a shared byte buffer. Views share the buffer.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace llaisys {

// Plain element types, and GGUF's block-quantized ones (quant.hpp), whose elements come in blocks
// of block_elements(dtype) values stored in block_bytes(dtype) bytes along the last dimension.
enum class DType : uint8_t { F32, F16, BF16, I32, I64, Q8_0, Q4_0, Q5_0, Q4_K, Q6_K };

bool is_quantized(DType dtype);
int64_t block_elements(DType dtype);  // 1 for plain types
size_t block_bytes(DType dtype);      // the element size for plain types
size_t bytes_of(DType dtype, int64_t n_elements);  // n_elements must be whole blocks
const char* dtype_name(DType dtype);

// Invariant violations are programming errors: they carry file:line and surface in Python as
// RuntimeError (an exception rather than abort(), so that one bad call cannot kill a cluster engine).
[[noreturn]] void fail(const char* file, int line, const std::string& message);
#define LLAISYS_CHECK(cond, message)                               \
    do {                                                           \
        if (!(cond)) ::llaisys::fail(__FILE__, __LINE__, (message)); \
    } while (0)

struct Tensor {
    DType dtype = DType::F32;
    std::vector<int64_t> shape;
    std::vector<int64_t> strides;   // in elements (for quantized types, whole blocks along dim 0)
    std::shared_ptr<void> storage;  // owns the bytes, or keeps their owner alive
    std::byte* base = nullptr;      // address of element [0, 0, ...]

    static Tensor empty(std::vector<int64_t> shape, DType dtype);
    static Tensor zeros(std::vector<int64_t> shape, DType dtype);
    // Wraps memory owned elsewhere (a numpy array, a mapped file); `owner` keeps it alive.
    static Tensor borrow(void* data, std::vector<int64_t> shape, std::vector<int64_t> strides,
                         DType dtype, std::shared_ptr<void> owner);

    bool defined() const { return base != nullptr; }  // false for a default-constructed (absent) tensor
    int64_t ndim() const { return static_cast<int64_t>(shape.size()); }
    int64_t size(int64_t dim) const;  // negative dims count from the end
    int64_t numel() const;
    size_t nbytes() const { return bytes_of(dtype, numel()); }
    bool is_contiguous() const;

    Tensor slice(int64_t dim, int64_t begin, int64_t end) const;  // a view of [begin, end) along dim
    Tensor view(std::vector<int64_t> new_shape) const;              // reshape of a contiguous tensor

    template <class T>
    T* data() const { return reinterpret_cast<T*>(base); }
    std::byte* row(int64_t i) const { return base + bytes_of(dtype, i * strides[0]); }
};

constexpr size_t kHugePage = size_t{2} << 20;
// Zeros on huge pages, for a buffer that is read whole and often (weights): decode streams every
// weight once per token, and with 4 KiB pages that costs a TLB miss every 4 KiB. The advice comes
// before the zeroing, since the first write picks the page size (advised after it, 16 MiB of an
// 800 MiB Q8_0 model were on huge pages). Buffers under 16 MiB share chunks of huge pages (a rank's
// slices of a layer are far below 2 MiB). Caches stay on small pages, so that only the positions in
// use take memory.
Tensor zeros_on_huge_pages(std::vector<int64_t> shape, DType dtype);

// Element conversions shared by every op: bf16/f16 are widened to f32 for arithmetic. The bf16 ones
// are inline so that loops over them vectorize.
inline float bf16_to_f32(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

inline uint16_t f32_to_bf16(float value) {  // round to nearest even
    uint32_t u = std::bit_cast<uint32_t>(value);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t bits);
uint16_t f32_to_f16(float value);   // round to nearest even

void to_f32(float* dst, const std::byte* src, DType dtype, int64_t n);    // a contiguous run
void from_f32(std::byte* dst, DType dtype, const float* src, int64_t n);  // a contiguous run

// dst = src, elementwise over equal shapes, converting dtype; either side may be strided.
void copy(Tensor& dst, const Tensor& src);

}  // namespace llaisys
