#include "shared_all_reduce.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <immintrin.h>
#include <sched.h>
#include <string>
#include <sys/mman.h>
#include <thread>

namespace llaisys {
namespace {

constexpr size_t kLine = 64;
constexpr int64_t kParallelBytes = 64 * 1024;  // smaller pieces are not worth waking threads for

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Waits until every rank's flag has reached `target`. Spins first (a decode step's peers arrive
// within microseconds), then yields the core (ranks may outnumber cores), then naps: a peer that is
// far behind (still in the previous reply's Python, or stopped) costs no CPU.
void wait_for_all(std::byte* flags, int ranks, uint64_t target) {
    auto reached = [&] {
        for (int r = 0; r < ranks; ++r)
            if (reinterpret_cast<std::atomic<uint64_t>*>(flags + r * kLine)->load(std::memory_order_acquire) < target)
                return false;
        return true;
    };
    for (int i = 0; i < 4096; ++i) {
        if (reached()) return;
        _mm_pause();
    }
    const auto start = std::chrono::steady_clock::now();
    while (!reached()) {
        if (std::chrono::steady_clock::now() - start < std::chrono::milliseconds(10)) sched_yield();
        else std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
}

void arrive(std::byte* flags, int rank, uint64_t value) {
    reinterpret_cast<std::atomic<uint64_t>*>(flags + rank * kLine)->store(value, std::memory_order_release);
}

void copy_bytes(std::byte* dst, const std::byte* src, int64_t bytes) {
    if (bytes < kParallelBytes) {
        std::memcpy(dst, src, bytes);
        return;
    }
    constexpr int64_t kPart = 16 * 1024;
#pragma omp parallel for schedule(static)
    for (int64_t at = 0; at < bytes; at += kPart) std::memcpy(dst + at, src + at, std::min(kPart, bytes - at));
}

// out[i] = sum over ranks r (in order) of slot r's element i, for i in [begin, end).
template <class T>
void sum_slots(T* out, const std::byte* slots, int ranks, int64_t begin, int64_t end) {
#pragma omp parallel for schedule(static) if ((end - begin) * static_cast<int64_t>(sizeof(T)) >= kParallelBytes)
    for (int64_t i = begin; i < end; ++i) {
        T total = reinterpret_cast<const T*>(slots)[i];
        for (int r = 1; r < ranks; ++r) total += reinterpret_cast<const T*>(slots + r * SharedSegment::kSlotBytes)[i];
        out[i] = total;
    }
}

}  // namespace

size_t SharedSegment::bytes_for(int ranks) { return round_up(ranks * kLine, 4096) + (ranks + 1) * kSlotBytes; }

SharedSegment::SharedSegment(int fd, size_t size) : bytes(size) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    LLAISYS_CHECK(p != MAP_FAILED, std::string("cannot map the ranks' shared segment: ") + std::strerror(errno));
    base = static_cast<std::byte*>(p);
}

SharedSegment::~SharedSegment() { munmap(base, bytes); }

AllReduce shared_all_reduce(std::shared_ptr<SharedSegment> segment, int rank, int ranks) {
    LLAISYS_CHECK(segment && 0 <= rank && rank < ranks && segment->bytes >= SharedSegment::bytes_for(ranks),
                  "the shared segment is too small for the ranks");
    auto calls = std::make_shared<uint64_t>(0);
    return [segment, rank, ranks, calls](Tensor& t) {
        LLAISYS_CHECK(t.is_contiguous() && (t.dtype == DType::F32 || t.dtype == DType::I64),
                      "all_reduce takes contiguous f32 or i64 tensors");
        std::byte* flags = segment->base;
        std::byte* result = flags + round_up(ranks * kLine, 4096);
        std::byte* slots = result + SharedSegment::kSlotBytes;
        const int64_t element = t.dtype == DType::F32 ? 4 : 8;
        const int64_t per_piece = SharedSegment::kSlotBytes / element, align = kLine / element;
        for (int64_t p0 = 0; p0 < t.numel(); p0 += per_piece) {
            const int64_t n = std::min(per_piece, t.numel() - p0);
            std::byte* data = t.base + p0 * element;
            const uint64_t call = ++*calls;
            copy_bytes(slots + rank * SharedSegment::kSlotBytes, data, n * element);
            arrive(flags, rank, 2 * call - 1);
            wait_for_all(flags, ranks, 2 * call - 1);
            // This rank's share of the sums, whole cache lines apart from its neighbours'.
            const int64_t share = round_up((n + ranks - 1) / ranks, align);
            const int64_t begin = std::min(n, rank * share), end = std::min(n, begin + share);
            if (t.dtype == DType::F32) sum_slots(reinterpret_cast<float*>(result), slots, ranks, begin, end);
            else sum_slots(reinterpret_cast<int64_t*>(result), slots, ranks, begin, end);
            arrive(flags, rank, 2 * call);
            wait_for_all(flags, ranks, 2 * call);
            copy_bytes(data, result, n * element);
        }
    };
}

}  // namespace llaisys
