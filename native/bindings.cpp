// Python bindings (module llaisys_chat._native): numpy arrays cross as Tensors (a type caster that
// shares memory both ways), the model's plain structs as typed classes. No logic lives here.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "mpi_all_reduce.hpp"
#include "ops.hpp"
#include "qwen2.hpp"

namespace py = pybind11;
using namespace llaisys;

namespace {

// numpy has no bfloat16: bf16 tensors travel as uint16 arrays holding the bits.
DType dtype_of(const py::array& a) {
    if (a.dtype().is(py::dtype::of<float>())) return DType::F32;
    if (a.dtype().is(py::dtype("float16"))) return DType::F16;
    if (a.dtype().is(py::dtype::of<uint16_t>())) return DType::BF16;
    if (a.dtype().is(py::dtype::of<int32_t>())) return DType::I32;
    if (a.dtype().is(py::dtype::of<int64_t>())) return DType::I64;
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
    for (int64_t s : t.strides) strides.push_back(s * static_cast<py::ssize_t>(dtype_size(t.dtype)));
    auto holder = new std::shared_ptr<void>(t.storage);
    py::capsule base(holder, [](void* p) { delete static_cast<std::shared_ptr<void>*>(p); });
    return py::array(numpy_dtype(t.dtype), shape, strides, t.base, base);
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

}  // namespace

namespace pybind11::detail {
// numpy array <-> Tensor, sharing memory: a Tensor& parameter writes into the caller's array. An
// absent (default) Tensor reads back as None.
template <>
struct type_caster<Tensor> {
    PYBIND11_TYPE_CASTER(Tensor, const_name("numpy.ndarray"));

    bool load(handle src, bool) {
        if (!isinstance<array>(src)) return false;
        value = from_numpy(reinterpret_borrow<array>(src));
        return true;
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
        .value("I64", DType::I64);
    py::enum_<Reduction>(m, "Reduction", "How row-parallel partial sums are joined over ranks.")
        .value("EXACT", Reduction::Exact)
        .value("FAST", Reduction::Fast);

    // -- ops (out parameters first; they write into the arrays passed) --------------------------
    py::class_<ops::PackedWeight>(m, "PackedWeight")
        .def_readonly("n_out", &ops::PackedWeight::n_out)
        .def_readonly("n_in", &ops::PackedWeight::n_in);
    m.def("pack_weight", &ops::pack_weight, "Repack W[n_out, n_in] into kernel panels of dtype BF16 or F32.");
    m.def("embedding", &ops::embedding);
    m.def("linear", [](Tensor& out, const Tensor& x, const ops::PackedWeight& w, std::optional<Tensor> bias) {
        py::gil_scoped_release nogil;
        ops::linear(out, x, w, bias ? &*bias : nullptr);
    }, py::arg("out"), py::arg("x"), py::arg("w"), py::arg("bias") = py::none());
    m.def("linear_fixed", &ops::linear_fixed);
    m.def("from_fixed", &ops::from_fixed);
    m.def("rms_norm", &ops::rms_norm);
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
    plain_struct<Qwen2Options>(m, "Qwen2Options", "Compute dtype, threads, reduction and down_proj's reduction block.")
        .def_readwrite("compute", &Qwen2Options::compute)
        .def_readwrite("threads", &Qwen2Options::threads)
        .def_readwrite("reduction", &Qwen2Options::reduction)
        .def_readwrite("ffn_block", &Qwen2Options::ffn_block);
    plain_struct<Qwen2LayerWeights>(m, "Qwen2LayerWeights", "One layer's weight slices (numpy arrays).")
        .def_readwrite("attn_norm", &Qwen2LayerWeights::attn_norm)
        .def_readwrite("q", &Qwen2LayerWeights::q)
        .def_readwrite("q_bias", &Qwen2LayerWeights::q_bias)
        .def_readwrite("k", &Qwen2LayerWeights::k)
        .def_readwrite("k_bias", &Qwen2LayerWeights::k_bias)
        .def_readwrite("v", &Qwen2LayerWeights::v)
        .def_readwrite("v_bias", &Qwen2LayerWeights::v_bias)
        .def_readwrite("o", &Qwen2LayerWeights::o)
        .def_readwrite("ffn_norm", &Qwen2LayerWeights::ffn_norm)
        .def_readwrite("gate", &Qwen2LayerWeights::gate)
        .def_readwrite("up", &Qwen2LayerWeights::up)
        .def_readwrite("down", &Qwen2LayerWeights::down);
    plain_struct<Qwen2Weights>(m, "Qwen2Weights", "The model's weight slices: global tensors and a list of layers.")
        .def_readwrite("embed_tokens", &Qwen2Weights::embed_tokens)
        .def_readwrite("final_norm", &Qwen2Weights::final_norm)
        .def_readwrite("lm_head", &Qwen2Weights::lm_head)
        .def_readwrite("layers", &Qwen2Weights::layers);
    plain_struct<MpiHandles>(m, "MpiHandles", "MPI_Allreduce's address and the handles it takes (from mpi4py).")
        .def_readwrite("allreduce", &MpiHandles::allreduce)
        .def_readwrite("comm", &MpiHandles::comm)
        .def_readwrite("f32", &MpiHandles::f32)
        .def_readwrite("i64", &MpiHandles::i64)
        .def_readwrite("sum", &MpiHandles::sum);

    py::class_<KVCache>(m, "KVCache")
        .def_readonly("capacity", &KVCache::capacity)
        .def_property_readonly("n_tokens", [](const KVCache& c) { return c.tokens.size(); })
        .def_property_readonly("tokens", [](const KVCache& c) { return py::array_t<int32_t>(c.tokens.size(), c.tokens.data()); })
        .def_property_readonly("nbytes", &KVCache::nbytes)
        .def("truncate", &KVCache::truncate);

    py::class_<Qwen2>(m, "Qwen2")
        .def(py::init([](const Qwen2Config& config, const Shard& shard, const Qwen2Weights& weights,
                         const Qwen2Options& options, std::optional<MpiHandles> mpi) {
                 AllReduce hook = mpi ? mpi_all_reduce(*mpi) : AllReduce{};
                 py::gil_scoped_release nogil;
                 return std::make_unique<Qwen2>(config, shard, weights, options, hook);
             }),
             py::arg("config"), py::arg("shard"), py::arg("weights"), py::arg("options"), py::arg("mpi") = py::none())
        .def("new_cache", &Qwen2::new_cache, py::arg("capacity"))
        .def("forward", [](Qwen2& model, KVCache& cache, std::vector<int32_t> tokens, bool all_positions) {
            py::gil_scoped_release nogil;
            return model.forward(cache, tokens, all_positions);
        }, py::arg("cache"), py::arg("tokens"), py::arg("all_positions") = false)
        .def_property_readonly("weight_bytes", &Qwen2::weight_bytes);
}
