#include "tensor.hpp"

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>

#include <sys/mman.h>

namespace llaisys {

bool is_quantized(DType dtype) { return block_elements(dtype) > 1; }

int64_t block_elements(DType dtype) {
    switch (dtype) {
        case DType::Q8_0: case DType::Q4_0: case DType::Q5_0: return 32;
        case DType::Q4_K: case DType::Q6_K: return 256;
        default: return 1;
    }
}

size_t block_bytes(DType dtype) {
    switch (dtype) {
        case DType::F32: return 4;
        case DType::F16: return 2;
        case DType::BF16: return 2;
        case DType::I32: return 4;
        case DType::I64: return 8;
        case DType::Q8_0: return 34;
        case DType::Q4_0: return 18;
        case DType::Q5_0: return 22;
        case DType::Q4_K: return 144;
        case DType::Q6_K: return 210;
    }
    fail(__FILE__, __LINE__, "unknown dtype");
}

size_t bytes_of(DType dtype, int64_t n_elements) {
    const int64_t block = block_elements(dtype);
    LLAISYS_CHECK(n_elements % block == 0, std::string(dtype_name(dtype)) + " data must be whole blocks of " +
                                               std::to_string(block) + " values");
    return static_cast<size_t>(n_elements / block) * block_bytes(dtype);
}

const char* dtype_name(DType dtype) {
    switch (dtype) {
        case DType::F32: return "f32";
        case DType::F16: return "f16";
        case DType::BF16: return "bf16";
        case DType::I32: return "i32";
        case DType::I64: return "i64";
        case DType::Q8_0: return "q8_0";
        case DType::Q4_0: return "q4_0";
        case DType::Q5_0: return "q5_0";
        case DType::Q4_K: return "q4_k";
        case DType::Q6_K: return "q6_k";
    }
    return "?";
}

void fail(const char* file, int line, const std::string& message) {
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + message);
}

static std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
    std::vector<int64_t> strides(shape.size());
    int64_t stride = 1;
    for (size_t i = shape.size(); i-- > 0;) {
        strides[i] = stride;
        stride *= shape[i];
    }
    return strides;
}

Tensor Tensor::empty(std::vector<int64_t> shape, DType dtype) {
    Tensor t;
    t.dtype = dtype;
    t.strides = contiguous_strides(shape);
    t.shape = std::move(shape);
    // 64-byte alignment lets the kernels use aligned 512-bit loads on packed weights; buffers of
    // 2 MiB or more start on a 2 MiB boundary so that they can be backed by huge pages.
    size_t align = t.nbytes() >= kHugePage ? kHugePage : 64;
    size_t bytes = (t.nbytes() + align - 1) / align * align;
    void* p = std::aligned_alloc(align, bytes ? bytes : align);
    LLAISYS_CHECK(p != nullptr, "out of memory allocating " + std::to_string(bytes) + " bytes");
    t.storage = std::shared_ptr<void>(p, std::free);
    t.base = static_cast<std::byte*>(p);
    return t;
}

namespace {

// Buffers below kChunk share chunks of huge pages: each is carved from the current chunk, which lives
// as long as any buffer in it (a shard's slices of a layer's matrices are far below 2 MiB from 4
// ranks on: each on its own would sit on 4 KiB pages). A chunk's untouched pages cost no memory.
constexpr size_t kChunk = 8 * kHugePage;

void advise_huge([[maybe_unused]] void* p, [[maybe_unused]] size_t bytes) {
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
}

class ChunkPool {
  public:
    // `bytes` (64-byte aligned) of the current chunk, or of a fresh one when it has no room left.
    std::shared_ptr<void> take(size_t bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!chunk_ || used_ + bytes > kChunk) {
            void* p = std::aligned_alloc(kHugePage, kChunk);
            LLAISYS_CHECK(p != nullptr, "out of memory allocating a chunk of weights");
            advise_huge(p, kChunk);
            chunk_ = std::shared_ptr<std::byte>(static_cast<std::byte*>(p), std::free);
            used_ = 0;
        }
        std::shared_ptr<void> buffer(chunk_, chunk_.get() + used_);  // shares the chunk's ownership
        used_ += (bytes + 63) / 64 * 64;
        return buffer;
    }

  private:
    std::mutex mutex_;
    std::shared_ptr<std::byte> chunk_;
    size_t used_ = 0;
};

}  // namespace

Tensor zeros_on_huge_pages(std::vector<int64_t> shape, DType dtype) {
    static ChunkPool pool;
    Tensor t;
    t.dtype = dtype;
    t.strides = contiguous_strides(shape);
    t.shape = std::move(shape);
    if (t.nbytes() < kChunk) {
        t.storage = pool.take(std::max<size_t>(t.nbytes(), 1));
        t.base = static_cast<std::byte*>(t.storage.get());
    } else {  // its own whole huge pages (the last one partly used)
        t = Tensor::empty(t.shape, dtype);
        advise_huge(t.base, (t.nbytes() + kHugePage - 1) / kHugePage * kHugePage);
    }
    std::memset(t.base, 0, t.nbytes());
    return t;
}

Tensor Tensor::zeros(std::vector<int64_t> shape, DType dtype) {
    Tensor t = empty(std::move(shape), dtype);
    std::memset(t.base, 0, t.nbytes());
    return t;
}

Tensor Tensor::borrow(void* data, std::vector<int64_t> shape, std::vector<int64_t> strides,
                      DType dtype, std::shared_ptr<void> owner) {
    LLAISYS_CHECK(shape.size() == strides.size(), "shape and strides differ in rank");
    Tensor t;
    t.dtype = dtype;
    t.shape = std::move(shape);
    t.strides = std::move(strides);
    t.storage = std::move(owner);
    t.base = static_cast<std::byte*>(data);
    return t;
}

int64_t Tensor::size(int64_t dim) const {
    if (dim < 0) dim += ndim();
    LLAISYS_CHECK(dim >= 0 && dim < ndim(), "dimension out of range");
    return shape[dim];
}

int64_t Tensor::numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
}

bool Tensor::is_contiguous() const { return strides == contiguous_strides(shape); }

Tensor Tensor::slice(int64_t dim, int64_t begin, int64_t end) const {
    if (dim < 0) dim += ndim();
    LLAISYS_CHECK(dim >= 0 && dim < ndim(), "slice dimension out of range");
    LLAISYS_CHECK(0 <= begin && begin <= end && end <= shape[dim], "slice bounds out of range");
    Tensor t = *this;
    t.shape[dim] = end - begin;
    t.base = base + bytes_of(dtype, begin * strides[dim]);
    return t;
}

Tensor Tensor::view(std::vector<int64_t> new_shape) const {
    LLAISYS_CHECK(is_contiguous(), "view needs a contiguous tensor");
    Tensor t = *this;
    t.strides = contiguous_strides(new_shape);
    t.shape = std::move(new_shape);
    LLAISYS_CHECK(t.numel() == numel(), "view changes the number of elements");
    return t;
}

float f16_to_f32(uint16_t bits) { return static_cast<float>(std::bit_cast<_Float16>(bits)); }

uint16_t f32_to_f16(float value) { return std::bit_cast<uint16_t>(static_cast<_Float16>(value)); }

void to_f32(float* dst, const std::byte* src, DType dtype, int64_t n) {
    switch (dtype) {
        case DType::F32: std::memcpy(dst, src, n * sizeof(float)); return;
        case DType::BF16: {
            auto s = reinterpret_cast<const uint16_t*>(src);
            for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
            return;
        }
        case DType::F16: {
            auto s = reinterpret_cast<const uint16_t*>(src);
            for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
            return;
        }
        default: fail(__FILE__, __LINE__, std::string("not a float dtype: ") + dtype_name(dtype));
    }
}

void from_f32(std::byte* dst, DType dtype, const float* src, int64_t n) {
    switch (dtype) {
        case DType::F32: std::memcpy(dst, src, n * sizeof(float)); return;
        case DType::BF16: {
            auto d = reinterpret_cast<uint16_t*>(dst);
            for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
            return;
        }
        case DType::F16: {
            auto d = reinterpret_cast<uint16_t*>(dst);
            for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
            return;
        }
        default: fail(__FILE__, __LINE__, std::string("not a float dtype: ") + dtype_name(dtype));
    }
}

// Copies the last dimension as contiguous runs when both sides allow it, converting through f32.
static void copy_rows(const Tensor& dst, const Tensor& src, int64_t dim, std::byte* d, const std::byte* s,
                      std::vector<float>& scratch) {
    size_t ds = block_bytes(dst.dtype), ss = block_bytes(src.dtype);
    if (dim == dst.ndim() - 1) {
        int64_t n = dst.shape[dim];
        if (dst.strides[dim] == 1 && src.strides[dim] == 1) {
            if (dst.dtype == src.dtype) {
                std::memcpy(d, s, n * ds);
            } else {
                scratch.resize(n);
                to_f32(scratch.data(), s, src.dtype, n);
                from_f32(d, dst.dtype, scratch.data(), n);
            }
            return;
        }
        for (int64_t i = 0; i < n; ++i) {
            float v;
            to_f32(&v, s + i * src.strides[dim] * ss, src.dtype, 1);
            from_f32(d + i * dst.strides[dim] * ds, dst.dtype, &v, 1);
        }
        return;
    }
    for (int64_t i = 0; i < dst.shape[dim]; ++i)
        copy_rows(dst, src, dim + 1, d + i * dst.strides[dim] * ds, s + i * src.strides[dim] * ss, scratch);
}

void copy(Tensor& dst, const Tensor& src) {
    LLAISYS_CHECK(dst.shape == src.shape, "copy between different shapes");
    LLAISYS_CHECK(!is_quantized(dst.dtype) && !is_quantized(src.dtype), "copy takes plain dtypes (quant.hpp converts)");
    if (dst.numel() == 0) return;
    bool ints = dst.dtype == DType::I32 || dst.dtype == DType::I64;
    LLAISYS_CHECK(!ints || dst.dtype == src.dtype, "integer copies cannot convert dtype");
    if (ints || dst.ndim() == 0) {
        LLAISYS_CHECK(dst.is_contiguous() && src.is_contiguous(), "integer copies must be contiguous");
        std::memcpy(dst.base, src.base, dst.nbytes());
        return;
    }
    std::vector<float> scratch;
    copy_rows(dst, src, 0, dst.base, src.base, scratch);
}

}  // namespace llaisys
