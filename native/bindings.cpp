// Python bindings (module llaisys_chat._native): conversions between numpy and Tensor, nothing more.
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

DType parse_dtype(const std::string& name) {
    if (name == "f32") return DType::F32;
    if (name == "f16") return DType::F16;
    if (name == "bf16") return DType::BF16;
    if (name == "i32") return DType::I32;
    if (name == "i64") return DType::I64;
    throw py::value_error("unknown dtype " + name);
}

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
Tensor from_numpy(py::array a) {
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

Tensor arg(py::array a) { return from_numpy(std::move(a)); }

template <class T>
T field(const py::dict& d, const char* key) {
    if (!d.contains(key)) throw py::key_error(key);
    return d[key].cast<T>();
}

}  // namespace

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

    py::class_<ops::PackedWeight>(m, "PackedWeight")
        .def_readonly("n_out", &ops::PackedWeight::n_out)
        .def_readonly("n_in", &ops::PackedWeight::n_in);

    m.def("pack_weight", [](py::array w, const std::string& dtype) { return ops::pack_weight(arg(w), parse_dtype(dtype)); },
          "Repack W[n_out, n_in] into kernel panels of dtype bf16 or f32.");
    m.def("embedding", [](py::array out, py::array ids, py::array table, int64_t vocab_begin) {
        Tensor o = arg(out);
        ops::embedding(o, arg(ids), arg(table), vocab_begin);
    });
    m.def("linear", [](py::array out, py::array x, const ops::PackedWeight& w, std::optional<py::array> bias) {
        Tensor o = arg(out), xt = arg(x);
        std::optional<Tensor> b;
        if (bias) b = arg(*bias);
        py::gil_scoped_release nogil;
        ops::linear(o, xt, w, b ? &*b : nullptr);
    }, py::arg("out"), py::arg("x"), py::arg("w"), py::arg("bias") = py::none());
    m.def("linear_fixed", [](py::array out, py::array x, const ops::PackedWeight& w, int64_t k_block) {
        Tensor o = arg(out);
        ops::linear_fixed(o, arg(x), w, k_block);
    });
    m.def("from_fixed", [](py::array out, py::array in) {
        Tensor o = arg(out);
        ops::from_fixed(o, arg(in));
    });
    m.def("rms_norm", [](py::array out, py::array x, py::array w, float eps) {
        Tensor o = arg(out);
        ops::rms_norm(o, arg(x), arg(w), eps);
    });
    m.def("rope", [](py::array out, py::array x, py::array positions, float theta) {
        Tensor o = arg(out);
        ops::rope(o, arg(x), arg(positions), theta);
    });
    m.def("self_attention", [](py::array out, py::array q, py::array k_cache, py::array v_cache,
                               std::vector<int64_t> kv_head_of, int64_t n_past, float scale) {
        Tensor o = arg(out);
        ops::self_attention(o, arg(q), arg(k_cache), arg(v_cache), kv_head_of, n_past, scale);
    });
    m.def("swiglu", [](py::array out, py::array gate, py::array up) {
        Tensor o = arg(out);
        ops::swiglu(o, arg(gate), arg(up));
    });
    m.def("add", [](py::array out, py::array a, py::array b) {
        Tensor o = arg(out);
        ops::add(o, arg(a), arg(b));
    });
    m.def("argmax", [](py::array x) { return ops::argmax(arg(x)); });
    m.def("gumbel_noise", [](uint64_t seed, uint64_t step, std::vector<int64_t> token_ids) {
        std::vector<float> noise = ops::gumbel_noise(seed, step, token_ids);
        return py::array_t<float>(noise.size(), noise.data());
    }, py::arg("seed"), py::arg("step"), py::arg("token_ids"), "Gumbel noise of each token id at (seed, step).");
    m.def("gumbel_argmax", [](py::array x, float inv_temperature, uint64_t seed, uint64_t step, int64_t id_offset) {
        return ops::gumbel_argmax(arg(x), inv_temperature, seed, step, id_offset);
    });
    m.def("top_k", [](py::array x, int64_t k) {
        auto [values, indices] = ops::top_k(arg(x), k);
        return py::make_tuple(py::array_t<float>(values.size(), values.data()),
                              py::array_t<int64_t>(indices.size(), indices.data()));
    });

    py::class_<KVCache>(m, "KVCache")
        .def_readonly("capacity", &KVCache::capacity)
        .def_property_readonly("n_tokens", [](const KVCache& c) { return c.tokens.size(); })
        .def_property_readonly("tokens", [](const KVCache& c) { return py::array_t<int32_t>(c.tokens.size(), c.tokens.data()); })
        .def_property_readonly("nbytes", &KVCache::nbytes)
        .def("truncate", &KVCache::truncate);

    py::class_<Qwen2>(m, "Qwen2")
        .def(py::init([](py::dict config, py::dict shard, py::dict weights, const std::string& compute, int threads,
                         const std::string& reduction, int64_t ffn_block, std::optional<py::dict> mpi) {
                 Qwen2Config c;
                 for (auto [name, member] : {std::pair{"vocab_size", &Qwen2Config::vocab_size},
                                             {"hidden_size", &Qwen2Config::hidden_size}, {"n_layer", &Qwen2Config::n_layer},
                                             {"n_head", &Qwen2Config::n_head}, {"n_head_kv", &Qwen2Config::n_head_kv},
                                             {"head_dim", &Qwen2Config::head_dim}, {"ffn_size", &Qwen2Config::ffn_size}})
                     c.*member = field<int64_t>(config, name);
                 c.rope_theta = field<float>(config, "rope_theta");
                 c.rms_eps = field<float>(config, "rms_eps");
                 Shard s;
                 for (auto [name, member] : {std::pair{"head_begin", &Shard::head_begin}, {"head_end", &Shard::head_end},
                                             {"kv_begin", &Shard::kv_begin}, {"kv_end", &Shard::kv_end},
                                             {"ffn_begin", &Shard::ffn_begin}, {"ffn_end", &Shard::ffn_end},
                                             {"vocab_begin", &Shard::vocab_begin}, {"vocab_end", &Shard::vocab_end}})
                     s.*member = field<int64_t>(shard, name);
                 Qwen2Options o;
                 o.compute = parse_dtype(compute);
                 o.threads = threads;
                 if (reduction != "exact" && reduction != "fast") throw py::value_error("reduction is exact or fast");
                 o.reduction = reduction == "exact" ? Reduction::Exact : Reduction::Fast;
                 o.ffn_block = ffn_block;
                 std::map<std::string, Tensor> w;
                 for (auto item : weights) w[item.first.cast<std::string>()] = arg(item.second.cast<py::array>());
                 AllReduce hook;
                 if (mpi) {
                     MpiHandles h;
                     for (auto [name, member] : {std::pair{"allreduce", &MpiHandles::allreduce}, {"comm", &MpiHandles::comm},
                                                 {"f32", &MpiHandles::f32}, {"i64", &MpiHandles::i64}, {"sum", &MpiHandles::sum}})
                         h.*member = field<intptr_t>(*mpi, name);
                     hook = mpi_all_reduce(h);
                 }
                 py::gil_scoped_release nogil;
                 return std::make_unique<Qwen2>(c, s, w, o, hook);
             }),
             py::arg("config"), py::arg("shard"), py::arg("weights"), py::arg("compute") = "bf16",
             py::arg("threads") = 1, py::arg("reduction") = "exact", py::arg("ffn_block") = 64,
             py::arg("mpi") = py::none())
        .def("new_cache", &Qwen2::new_cache, py::arg("capacity"))
        .def("forward", [](Qwen2& model, KVCache& cache, std::vector<int32_t> tokens, bool all_positions) {
            Tensor logits;
            {
                py::gil_scoped_release nogil;
                logits = model.forward(cache, tokens, all_positions);
            }
            return to_numpy(logits);
        }, py::arg("cache"), py::arg("tokens"), py::arg("all_positions") = false)
        .def_property_readonly("weight_bytes", &Qwen2::weight_bytes);
}
