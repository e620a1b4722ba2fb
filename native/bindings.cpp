// Python bindings (module llaisys_chat._native): numpy arrays cross as Tensors (a type caster that
// shares memory both ways), the model's plain structs as typed classes. No logic lives here.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "mpi_all_reduce.hpp"
#include "ops.hpp"
#include "qwen2.hpp"
#include "quant.hpp"

namespace py = pybind11;
using namespace llaisys;

namespace {

// numpy has no bfloat16: bf16 tensors travel as uint16 arrays holding the bits. (Compared by kind
// and size: a memory-mapped array's dtype is an equal object, not always the same one.)
DType dtype_of(const py::array& a) {
    const char kind = a.dtype().kind();
    const auto size = a.itemsize();
    if (kind == 'f' && size == 4) return DType::F32;
    if (kind == 'f' && size == 2) return DType::F16;
    if (kind == 'u' && size == 2) return DType::BF16;
    if (kind == 'i' && size == 4) return DType::I32;
    if (kind == 'i' && size == 8) return DType::I64;
    throw py::type_error("unsupported array dtype " + std::string(py::str(a.dtype())));
}

py::dtype numpy_dtype(DType dtype) {
    switch (dtype) {
        case DType::F32: return py::dtype::of<float>();
        case DType::F16: return py::dtype("float16");
        case DType::BF16: return py::dtype::of<uint16_t>();
        case DType::I32: return py::dtype::of<int32_t>();
        case DType::I64: return py::dtype::of<int64_t>();
    }
    throw py::type_error("unknown dtype");
}

// A Tensor viewing the array's memory; the array stays alive as long as the tensor.
Tensor from_numpy(const py::array& a) {
    std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim()), strides(a.ndim());
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        LLAISYS_CHECK(a.strides(i) % static_cast<py::ssize_t>(a.itemsize()) == 0, "array strides are not whole elements");
        strides[i] = a.strides(i) / static_cast<py::ssize_t>(a.itemsize());
    }
    auto owner = std::make_shared<py::object>(a);
    // Release the reference under the GIL whenever the last tensor view goes away.
    std::shared_ptr<void> keep(owner.get(), [owner](void*) mutable {
        py::gil_scoped_acquire gil;
        owner.reset();
    });
    return Tensor::borrow(const_cast<void*>(a.data()), shape, strides, dtype_of(a), keep);
}

// An array viewing the tensor's memory; the tensor's storage stays alive as long as the array.
py::array to_numpy(const Tensor& t) {
    std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end()), strides;
    for (int64_t s : t.strides) strides.push_back(s * static_cast<py::ssize_t>(block_bytes(t.dtype)));
    auto holder = new std::shared_ptr<void>(t.storage);
    py::capsule base(holder, [](void* p) { delete static_cast<std::shared_ptr<void>*>(p); });
    return py::array(numpy_dtype(t.dtype), shape, strides, t.base, base);
}

// A quantized matrix from a uint8 array [rows, row bytes] of GGUF blocks (numpy has no such dtype).
struct QuantizedArray {
    Tensor tensor;
};

QuantizedArray quantized_array(const py::array& data, DType dtype) {
    LLAISYS_CHECK(is_quantized(dtype), "QuantizedArray takes a quantized dtype");
    LLAISYS_CHECK(data.dtype().kind() == 'u' && data.itemsize() == 1 && data.ndim() == 2 && data.strides(1) == 1,
                  "QuantizedArray takes a uint8 matrix with contiguous rows");
    const auto bytes = static_cast<int64_t>(block_bytes(dtype)), elements = block_elements(dtype);
    LLAISYS_CHECK(data.shape(1) % bytes == 0 && data.strides(0) % bytes == 0,
                  std::string("rows must be whole ") + dtype_name(dtype) + " blocks");
    auto owner = std::make_shared<py::object>(data);
    std::shared_ptr<void> keep(owner.get(), [owner](void*) mutable {
        py::gil_scoped_acquire gil;
        owner.reset();
    });
    return {Tensor::borrow(const_cast<void*>(data.data()), {data.shape(0), data.shape(1) / bytes * elements},
                           {data.strides(0) / bytes * elements, 1}, dtype, keep)};
}

// Struct(field=value, ...): sets the named fields of a plain struct; an unknown name is an AttributeError.
template <class T>
T from_kwargs(const py::kwargs& kwargs) {
    T value;
    py::object fields = py::cast(&value, py::return_value_policy::reference);
    for (auto [key, item] : kwargs) py::setattr(fields, key, item);
    return value;
}

template <class T>
py::class_<T> plain_struct(py::module_& m, const char* name, const char* doc) {
    return py::class_<T>(m, name, doc).def(py::init([](const py::kwargs& kwargs) { return from_kwargs<T>(kwargs); }));
}

struct AllReduceHook {
    AllReduce all_reduce;
};

}  // namespace

namespace pybind11::detail {
// numpy array (or QuantizedArray) <-> Tensor, sharing memory: a Tensor& parameter writes into the
// caller's array. An absent (default) Tensor reads back as None.
template <>
struct type_caster<Tensor> {
    PYBIND11_TYPE_CASTER(Tensor, const_name("numpy.ndarray"));

    bool load(handle src, bool) {
        if (isinstance<array>(src)) {
            value = from_numpy(reinterpret_borrow<array>(src));
            return true;
        }
        if (isinstance<QuantizedArray>(src)) {
            value = src.cast<const QuantizedArray&>().tensor;
            return true;
        }
        return false;
    }

    static handle cast(const Tensor& t, return_value_policy, handle) {
        if (!t.defined()) return none().release();
        return to_numpy(t).release();
    }
};
}  // namespace pybind11::detail

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native Qwen2 engine of llaisys-chat: tensors, ops and the model";

    m.def("build_info", [] {
        py::dict info;
#if defined(__AVX512BF16__)
        info["isa"] = "avx512-bf16";
#elif defined(__AVX512F__)
        info["isa"] = "avx512";
#elif defined(__AVX2__)
        info["isa"] = "avx2";
#else
        info["isa"] = "generic";
#endif
        info["amx"] = ops::amx_tiles();
#ifdef _OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        return info;
    }, "Instruction set the kernels were compiled for, and whether OpenMP is on.");

    py::enum_<DType>(m, "DType")
        .value("F32", DType::F32)
        .value("F16", DType::F16)
        .value("BF16", DType::BF16)
        .value("I32", DType::I32)
        .value("I64", DType::I64)
        .value("Q8_0", DType::Q8_0)
        .value("Q4_0", DType::Q4_0)
        .value("Q5_0", DType::Q5_0)
        .value("Q4_K", DType::Q4_K)
        .value("Q6_K", DType::Q6_K);
    m.def("block_elements", &block_elements, "Values per block of a dtype (1 for plain types).");
    py::class_<QuantizedArray>(m, "QuantizedArray", "A matrix of GGUF blocks: uint8 [rows, row bytes] and its type.")
        .def(py::init(&quantized_array), py::arg("data"), py::arg("dtype"))
        .def_property_readonly("dtype", [](const QuantizedArray& q) { return q.tensor.dtype; })
        .def_property_readonly("shape", [](const QuantizedArray& q) { return q.tensor.shape; });
    m.def("dequantize", [](const Tensor& w) {
        py::array_t<float> out({w.size(0), w.size(1)});
        for (int64_t r = 0; r < w.size(0); ++r) quant::dequantize_row(w.dtype, w.row(r), out.mutable_data(r), w.size(1));
        return out;
    }, "The values of a matrix of any float or quantized type, as f32.");
    m.def("quantize", [](const py::array_t<float, py::array::c_style>& x, DType dtype) {
        const int64_t rows = x.shape(0), cols = x.shape(1);
        py::array_t<uint8_t> out({rows, static_cast<int64_t>(bytes_of(dtype, cols))});
        for (int64_t r = 0; r < rows; ++r)
            quant::quantize_row(dtype, x.data(r), reinterpret_cast<std::byte*>(out.mutable_data(r)), cols);
        return out;
    }, "f32 rows quantized to Q8_0 or Q4_0 blocks (uint8 [rows, row bytes]).");
    py::enum_<Reduction>(m, "Reduction", "How row-parallel partial sums are joined over ranks.")
        .value("EXACT", Reduction::Exact)
        .value("FAST", Reduction::Fast);

    // -- ops (out parameters first; they write into the arrays passed) --------------------------
    py::class_<ops::PackedWeight>(m, "PackedWeight")
        .def_readonly("n_out", &ops::PackedWeight::n_out)
        .def_readonly("n_in", &ops::PackedWeight::n_in)
        .def_property_readonly("nbytes", &ops::PackedWeight::nbytes);
    m.def("pack_weight", [](const Tensor& w, DType dtype) {
        py::gil_scoped_release nogil;
        return ops::pack_weight(w, dtype);
    }, "Repack W[n_out, n_in] (float or quantized) into kernel panels of BF16, F32 or a quantized type.");
    m.def("pack_fused", [](const std::vector<std::pair<Tensor, DType>>& parts) {
        ops::PackedWeight fused;
        for (const auto& [w, dtype] : parts) ops::append_rows(fused, w, dtype);
        return fused;
    }, "Several weights' rows, one after another, each packed in its own dtype.");
    m.def("embedding", &ops::embedding);
    m.def("linear", [](Tensor& out, const Tensor& x, const ops::PackedWeight& w, std::optional<Tensor> bias) {
        py::gil_scoped_release nogil;
        ops::linear(out, x, w, bias ? &*bias : nullptr);
    }, py::arg("out"), py::arg("x"), py::arg("w"), py::arg("bias") = py::none());
    m.def("linear_fixed", &ops::linear_fixed);
    m.def("add_from_fixed", &ops::add_from_fixed);
    m.def("rms_norm", &ops::rms_norm);
    m.def("rope_angles", &ops::rope_angles);
    m.def("rope", &ops::rope);
    m.def("self_attention", &ops::self_attention);
    m.def("swiglu", &ops::swiglu);
    m.def("add", &ops::add);
    m.def("argmax", &ops::argmax);
    m.def("gumbel_noise", [](uint64_t seed, uint64_t step, std::vector<int64_t> token_ids) {
        std::vector<float> noise = ops::gumbel_noise(seed, step, token_ids);
        return py::array_t<float>(noise.size(), noise.data());
    }, py::arg("seed"), py::arg("step"), py::arg("token_ids"), "Gumbel noise of each token id at (seed, step).");
    m.def("gumbel_argmax", &ops::gumbel_argmax);
    m.def("top_k", [](const Tensor& x, int64_t k) {
        auto [values, indices] = ops::top_k(x, k);
        return py::make_tuple(py::array_t<float>(values.size(), values.data()),
                              py::array_t<int64_t>(indices.size(), indices.data()));
    });

    // -- the model -------------------------------------------------------------------------------
    plain_struct<Qwen2Config>(m, "Qwen2Config", "Hyper-parameters of a Qwen2 model.")
        .def_readwrite("vocab_size", &Qwen2Config::vocab_size)
        .def_readwrite("hidden_size", &Qwen2Config::hidden_size)
        .def_readwrite("n_layer", &Qwen2Config::n_layer)
        .def_readwrite("n_head", &Qwen2Config::n_head)
        .def_readwrite("n_head_kv", &Qwen2Config::n_head_kv)
        .def_readwrite("head_dim", &Qwen2Config::head_dim)
        .def_readwrite("ffn_size", &Qwen2Config::ffn_size)
        .def_readwrite("rope_theta", &Qwen2Config::rope_theta)
        .def_readwrite("rms_eps", &Qwen2Config::rms_eps);
    plain_struct<Shard>(m, "Shard", "The heads, MLP columns and vocabulary rows one rank holds.")
        .def_readwrite("head_begin", &Shard::head_begin)
        .def_readwrite("head_end", &Shard::head_end)
        .def_readwrite("kv_begin", &Shard::kv_begin)
        .def_readwrite("kv_end", &Shard::kv_end)
        .def_readwrite("ffn_begin", &Shard::ffn_begin)
        .def_readwrite("ffn_end", &Shard::ffn_end)
        .def_readwrite("vocab_begin", &Shard::vocab_begin)
        .def_readwrite("vocab_end", &Shard::vocab_end);
    plain_struct<Qwen2Options>(m, "Qwen2Options", "Cache dtype, threads, reduction and down_proj's reduction block.")
        .def_readwrite("cache", &Qwen2Options::cache)
        .def_readwrite("threads", &Qwen2Options::threads)
        .def_readwrite("reduction", &Qwen2Options::reduction)
        .def_readwrite("ffn_block", &Qwen2Options::ffn_block);
    py::enum_<Slot>(m, "Slot", "Where a loaded weight goes in the model (see Qwen2.load).")
        .value("EMBED_TOKENS", Slot::EmbedTokens)
        .value("FINAL_NORM", Slot::FinalNorm)
        .value("LM_HEAD", Slot::LmHead)
        .value("ATTN_NORM", Slot::AttnNorm)
        .value("Q", Slot::Q)
        .value("Q_BIAS", Slot::QBias)
        .value("K", Slot::K)
        .value("K_BIAS", Slot::KBias)
        .value("V", Slot::V)
        .value("V_BIAS", Slot::VBias)
        .value("O", Slot::O)
        .value("FFN_NORM", Slot::FfnNorm)
        .value("GATE", Slot::Gate)
        .value("UP", Slot::Up)
        .value("DOWN", Slot::Down);
    plain_struct<MpiHandles>(m, "MpiHandles", "MPI_Allreduce's address and the handles it takes (from mpi4py).")
        .def_readwrite("allreduce", &MpiHandles::allreduce)
        .def_readwrite("comm", &MpiHandles::comm)
        .def_readwrite("f32", &MpiHandles::f32)
        .def_readwrite("i64", &MpiHandles::i64)
        .def_readwrite("sum", &MpiHandles::sum)
        .def_readwrite("shared", &MpiHandles::shared)
        .def_readwrite("rank", &MpiHandles::rank)
        .def_readwrite("ranks", &MpiHandles::ranks);
    // (A struct around the std::function: pybind11 converts std::function itself to and from Python callables.)
    py::class_<AllReduceHook>(m, "AllReduce", "The model's all-reduce hook, callable on its own (tests, benchmarks).")
        .def(py::init([](const MpiHandles& h) { return AllReduceHook{mpi_all_reduce(h)}; }), py::arg("handles"))
        .def("__call__", [](const AllReduceHook& hook, Tensor& t) {
            py::gil_scoped_release nogil;
            hook.all_reduce(t);
        }, py::arg("array"), "Sums the array over ranks, in place (contiguous f32 or i64). Collective.");
    py::class_<SharedSegment, std::shared_ptr<SharedSegment>>(
        m, "SharedSegment", "A file (in /dev/shm) that all ranks on one host map, for their all-reduce.")
        .def(py::init<int, size_t>(), py::arg("fd"), py::arg("bytes"))
        .def_static("bytes_for", &SharedSegment::bytes_for, py::arg("ranks"));

    py::class_<KVCache>(m, "KVCache")
        .def_readonly("capacity", &KVCache::capacity)
        .def_property_readonly("n_tokens", [](const KVCache& c) { return c.tokens.size(); })
        .def_property_readonly("tokens", [](const KVCache& c) { return py::array_t<int32_t>(c.tokens.size(), c.tokens.data()); })
        .def_property_readonly("nbytes", &KVCache::nbytes)
        .def("truncate", &KVCache::truncate);

    py::class_<Qwen2>(m, "Qwen2")
        .def(py::init([](const Qwen2Config& config, const Shard& shard, const Qwen2Options& options,
                         std::optional<MpiHandles> mpi) {
                 return std::make_unique<Qwen2>(config, shard, options, mpi ? mpi_all_reduce(*mpi) : AllReduce{});
             }),
             py::arg("config"), py::arg("shard"), py::arg("options"), py::arg("mpi") = py::none())
        .def("load", [](Qwen2& model, Slot slot, int64_t layer, const Tensor& w, DType dtype) {
            py::gil_scoped_release nogil;
            model.load(slot, layer, w, dtype);
        }, py::arg("slot"), py::arg("layer"), py::arg("w"), py::arg("dtype"))
        .def("finish_loading", [](Qwen2& model) {
            py::gil_scoped_release nogil;
            model.finish_loading();
        })
        .def("new_cache", &Qwen2::new_cache, py::arg("capacity"))
        .def("drop_from_cache", &Qwen2::drop_from_cache, py::arg("cache"), py::arg("begin"), py::arg("end"))
        .def("forward", [](Qwen2& model, KVCache& cache, std::vector<int32_t> tokens, bool all_positions) {
            py::gil_scoped_release nogil;
            return model.forward(cache, tokens, all_positions);
        }, py::arg("cache"), py::arg("tokens"), py::arg("all_positions") = false)
        .def("forward_batch", [](Qwen2& model, std::vector<KVCache*> caches, std::vector<std::vector<int32_t>> tokens) {
            py::gil_scoped_release nogil;
            return model.forward_batch(caches, tokens);
        }, py::arg("caches"), py::arg("tokens"))
        .def_property_readonly_static("batch_tokens", [](py::object) { return Qwen2::kChunkTokens; })
        .def_property_readonly("weight_bytes", &Qwen2::weight_bytes)
        .def_property_readonly("decode_bytes", &Qwen2::decode_bytes);
}
