// The model's all_reduce hook over MPI, without building against MPI: MPI_Allreduce is called
// through a function pointer into the MPI library that mpi4py has already loaded, with handles
// mpi4py reports (MPI._handleof). The hook then runs in C++ only, without Python or its GIL.
#pragma once

#include <cstdint>
#include <memory>

#include "qwen2.hpp"
#include "shared_all_reduce.hpp"

namespace llaisys {

struct MpiHandles {
    intptr_t allreduce = 0;  // address of MPI_Allreduce
    intptr_t comm = 0;       // the communicator of the ranks sharing the model
    intptr_t f32 = 0;        // MPI_FLOAT
    intptr_t i64 = 0;        // MPI_INT64_T
    intptr_t sum = 0;        // MPI_SUM
    // Where all ranks share one host: the segment they all map, and this rank's place among them.
    std::shared_ptr<SharedSegment> shared;
    int rank = 0, ranks = 1;
};

// The all-reduce through the shared segment where there is one, else MPI_Allreduce. Handles are
// pointers in Open MPI and ints in MPICH; both travel in integer registers, so one pointer-sized
// signature calls either.
AllReduce mpi_all_reduce(const MpiHandles& handles);

}  // namespace llaisys
