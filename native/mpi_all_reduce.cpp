#include "mpi_all_reduce.hpp"

#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace llaisys {

using MpiAllreduce = int (*)(const void* send, void* recv, int count, intptr_t datatype, intptr_t op, intptr_t comm);

AllReduce mpi_all_reduce(const MpiHandles& h) {
    if (h.shared) return shared_all_reduce(h.shared, h.rank, h.ranks);
    LLAISYS_CHECK(h.allreduce != 0 && h.comm != 0, "MPI handles are missing");
    auto allreduce = reinterpret_cast<MpiAllreduce>(h.allreduce);
    // A separate receive buffer spares us MPI_IN_PLACE, whose value differs between MPI libraries.
    auto received = std::make_shared<std::vector<std::byte>>();
    return [allreduce, h, received](Tensor& t) {
        LLAISYS_CHECK(t.is_contiguous() && (t.dtype == DType::F32 || t.dtype == DType::I64),
                      "all_reduce takes contiguous f32 or i64 tensors");
        received->resize(t.nbytes());
        int rc = allreduce(t.base, received->data(), static_cast<int>(t.numel()), t.dtype == DType::F32 ? h.f32 : h.i64,
                           h.sum, h.comm);
        LLAISYS_CHECK(rc == 0, "MPI_Allreduce failed with error code " + std::to_string(rc));
        std::memcpy(t.base, received->data(), t.nbytes());
    };
}

}  // namespace llaisys
