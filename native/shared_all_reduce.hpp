// The model's all-reduce for ranks on one host: through a memory segment that every rank maps,
// with flags in it instead of MPI messages. Each call is a reduce-scatter then an all-gather, both
// run by the rank's own threads: a prompt's [tokens, hidden] sums move at memory speed (MPI's
// shared-memory path copies them with one thread a rank), and a decode step's waits cost what a
// cache line's trip between cores costs.
#pragma once

#include <cstddef>
#include <memory>

#include "qwen2.hpp"

namespace llaisys {

// A file (in /dev/shm) mapped into this process, unmapped when the last user lets go. Layout: one
// 64-byte flag per rank, then the result area, then one slot per rank, kSlotBytes each.
struct SharedSegment {
    static constexpr size_t kSlotBytes = size_t{1} << 20;  // larger tensors go through in pieces
    static size_t bytes_for(int ranks);

    SharedSegment(int fd, size_t bytes);
    ~SharedSegment();
    SharedSegment(const SharedSegment&) = delete;
    SharedSegment& operator=(const SharedSegment&) = delete;

    std::byte* base = nullptr;
    size_t bytes = 0;
};

// The hook for `rank` of `ranks`, all of which map the same (zero-filled) segment. The ranks call
// it in the same order (as they call MPI_Allreduce). Sums are exact for i64; f32 sums add the ranks
// in rank order, the same on every rank.
AllReduce shared_all_reduce(std::shared_ptr<SharedSegment> segment, int rank, int ranks);

}  // namespace llaisys
