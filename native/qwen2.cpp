#include "qwen2.hpp"

#include <cmath>
#include <cstring>
#include <string>

#include "quant.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace llaisys {
namespace {

void expect_shape(const Tensor& t, std::vector<int64_t> shape, const char* name) {
    LLAISYS_CHECK(t.shape == shape, std::string("weight ") + name + " has the wrong shape for this shard");
}

// Vectors end to end (biases of fused projections); an absent one (optional bias) is zeros.
Tensor concat_f32(const std::vector<std::pair<Tensor, int64_t>>& parts) {
    int64_t n = 0;
    for (const auto& [t, size] : parts) n += size;
    Tensor out = Tensor::zeros({n}, DType::F32);
    int64_t at = 0;
    for (const auto& [t, size] : parts) {
        if (t.defined()) {
            Tensor dst = out.slice(0, at, at + size);
            copy(dst, t);
        }
        at += size;
    }
    return out;
}

// A copy of w's rows in `dtype` (any float or quantized type), converting values through f32.
Tensor convert_rows(const Tensor& w, DType dtype) {
    const int64_t rows = w.size(0), cols = w.size(1);
    Tensor out = Tensor::empty({rows, cols}, dtype);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        if (w.dtype == dtype) {
            std::memcpy(out.row(r), w.row(r), bytes_of(dtype, cols));
            continue;
        }
        std::vector<float> values(cols);
        quant::dequantize_row(w.dtype, w.row(r), values.data(), cols);
        if (is_quantized(dtype)) quant::quantize_row(dtype, values.data(), out.row(r), cols);
        else from_f32(out.row(r), dtype, values.data(), cols);
    }
    return out;
}

// Fused projections: parts of several packed weights, one after another in the output.
ops::PackedWeight fuse(std::vector<ops::PackedWeight*> weights) {
    ops::PackedWeight fused;
    for (ops::PackedWeight* w : weights) {
        for (ops::PackedPart& part : w->parts) {
            part.row_begin = fused.n_out;
            fused.n_out += part.n_out;
            fused.parts.push_back(std::move(part));
        }
        fused.n_in = w->n_in;
        *w = ops::PackedWeight{};
    }
    return fused;
}

Tensor owned_f32(const Tensor& t) {
    Tensor out = Tensor::empty(t.shape, DType::F32);
    copy(out, t);
    return out;
}

// [M, n_heads, head_dim] view of columns [col_begin, ...) of a fused [M, C] projection output.
Tensor heads_view(const Tensor& fused, int64_t col_begin, int64_t n_heads, int64_t head_dim) {
    Tensor t = fused.slice(1, col_begin, col_begin + n_heads * head_dim);
    t.shape = {fused.size(0), n_heads, head_dim};
    t.strides = {fused.strides[0], head_dim, 1};
    return t;
}

}  // namespace

void KVCache::truncate(int64_t n_tokens) {
    LLAISYS_CHECK(0 <= n_tokens && n_tokens <= static_cast<int64_t>(tokens.size()), "truncate beyond the cache");
    tokens.resize(n_tokens);
}

size_t KVCache::nbytes() const {
    size_t total = 0;
    for (size_t i = 0; i < k.size(); ++i) total += k[i].nbytes() + v[i].nbytes();
    return total;
}

Qwen2::Qwen2(const Qwen2Config& config, const Shard& shard, const Qwen2Options& options, AllReduce all_reduce)
    : config_(config), shard_(shard), options_(options), all_reduce_(std::move(all_reduce)), layers(config.n_layer) {
    const int64_t H_l = shard.head_end - shard.head_begin;
    const int64_t F_l = shard.ffn_end - shard.ffn_begin, V_l = shard.vocab_end - shard.vocab_begin;
    LLAISYS_CHECK(options.cache == DType::BF16 || options.cache == DType::F32, "cache dtype must be bf16 or f32");
    // A shard may hold no heads or no MLP columns (more ranks than either has units): it adds zeros
    // to those sums. Every shard holds vocabulary rows.
    LLAISYS_CHECK(H_l >= 0 && F_l >= 0 && V_l > 0, "every shard needs vocabulary rows");
    LLAISYS_CHECK(config.n_head % config.n_head_kv == 0, "n_head must be a multiple of n_head_kv");
    LLAISYS_CHECK(F_l % options.ffn_block == 0 && options.ffn_block % 2 == 0,
                  "MLP shard must be whole even-sized reduction blocks");
    const int64_t group = config.n_head / config.n_head_kv;
    for (int64_t h = shard.head_begin; h < shard.head_end; ++h) {
        int64_t kv = h / group;
        LLAISYS_CHECK(shard.kv_begin <= kv && kv < shard.kv_end, "shard lacks a key/value head its queries read");
        kv_head_of.push_back(kv - shard.kv_begin);
    }
}

void Qwen2::load(Slot slot, int64_t layer, const Tensor& w, DType dtype) {
    LLAISYS_CHECK(!loaded_, "the model has finished loading");
    const int64_t D = config_.hidden_size, hd = config_.head_dim;
    const int64_t H_l = shard_.head_end - shard_.head_begin, KV_l = shard_.kv_end - shard_.kv_begin;
    const int64_t F_l = shard_.ffn_end - shard_.ffn_begin, V_l = shard_.vocab_end - shard_.vocab_begin;
    auto matrix = [&](ops::PackedWeight& packed, std::vector<int64_t> shape, const char* name) {
        expect_shape(w, std::move(shape), name);
        packed = ops::pack_weight(w, dtype);
    };
    auto vector = [&](Tensor& stored, int64_t n, const char* name) {
        expect_shape(w, {n}, name);
        stored = owned_f32(w);
    };
    switch (slot) {
        case Slot::EmbedTokens:
            expect_shape(w, {V_l, D}, "embed_tokens");
            embed_tokens = convert_rows(w, dtype);
            return;
        case Slot::FinalNorm: return vector(final_norm, D, "final_norm");
        case Slot::LmHead: return matrix(lm_head, {V_l, D}, "lm_head");
        default: break;
    }
    LLAISYS_CHECK(0 <= layer && layer < config_.n_layer, "layer index out of range");
    Qwen2Layer& l = layers[layer];
    switch (slot) {
        case Slot::AttnNorm: return vector(l.attn_norm, D, "attn_norm");
        case Slot::Q: return matrix(l.q, {H_l * hd, D}, "q");
        case Slot::QBias: return vector(l.q_bias, H_l * hd, "q_bias");
        case Slot::K: return matrix(l.k, {KV_l * hd, D}, "k");
        case Slot::KBias: return vector(l.k_bias, KV_l * hd, "k_bias");
        case Slot::V: return matrix(l.v, {KV_l * hd, D}, "v");
        case Slot::VBias: return vector(l.v_bias, KV_l * hd, "v_bias");
        case Slot::O: return matrix(l.o, {D, H_l * hd}, "o");
        case Slot::FfnNorm: return vector(l.ffn_norm, D, "ffn_norm");
        case Slot::Gate: return matrix(l.gate, {F_l, D}, "gate");
        case Slot::Up: return matrix(l.up, {F_l, D}, "up");
        case Slot::Down: return matrix(l.down, {D, F_l}, "down");
        default: fail(__FILE__, __LINE__, "unknown weight slot");
    }
}

void Qwen2::finish_loading() {
    LLAISYS_CHECK(!loaded_, "the model has finished loading");
    auto need = [](bool present, const std::string& name) { LLAISYS_CHECK(present, "missing weight " + name); };
    need(embed_tokens.defined(), "embed_tokens");
    need(final_norm.defined(), "final_norm");
    if (lm_head.parts.empty()) lm_head = ops::pack_weight(embed_tokens, embed_tokens.dtype);  // tied
    const int64_t hd = config_.head_dim;
    const int64_t H_l = shard_.head_end - shard_.head_begin, KV_l = shard_.kv_end - shard_.kv_begin;
    for (size_t i = 0; i < layers.size(); ++i) {
        Qwen2Layer& l = layers[i];
        const std::string at = " of layer " + std::to_string(i);
        need(l.attn_norm.defined(), "attn_norm" + at);
        need(!l.q.parts.empty() && !l.k.parts.empty() && !l.v.parts.empty(), "q, k or v" + at);
        need(!l.o.parts.empty(), "o" + at);
        need(l.ffn_norm.defined(), "ffn_norm" + at);
        need(!l.gate.parts.empty() && !l.up.parts.empty() && !l.down.parts.empty(), "gate, up or down" + at);
        l.qkv = fuse({&l.q, &l.k, &l.v});
        l.qkv_bias = concat_f32({{l.q_bias, H_l * hd}, {l.k_bias, KV_l * hd}, {l.v_bias, KV_l * hd}});
        l.q_bias = l.k_bias = l.v_bias = Tensor{};
        l.gate_up = fuse({&l.gate, &l.up});
    }
    loaded_ = true;
}

KVCache Qwen2::new_cache(int64_t capacity) const {
    LLAISYS_CHECK(capacity > 0, "cache capacity must be positive");
    KVCache cache;
    cache.capacity = capacity;
    int64_t kv_held = shard_.kv_end - shard_.kv_begin;
    for (int64_t i = 0; i < config_.n_layer; ++i) {
        // Untouched pages of a large allocation cost no memory until a long conversation fills them.
        cache.k.push_back(Tensor::empty({kv_held, capacity, config_.head_dim}, options_.cache));
        cache.v.push_back(Tensor::empty({kv_held, capacity, config_.head_dim}, options_.cache));
    }
    return cache;
}

void Qwen2::drop_from_cache(KVCache& cache, int64_t begin, int64_t end) const {
    const int64_t n = static_cast<int64_t>(cache.tokens.size()), moved = n - end, hd = config_.head_dim;
    LLAISYS_CHECK(0 <= begin && begin <= end && end <= n, "drop_from_cache: positions out of range");
    if (begin == end) return;
    Tensor shift = Tensor::empty({moved}, DType::I64), angles = Tensor::empty({moved, hd}, DType::F32);
    for (int64_t i = 0; i < moved; ++i) shift.data<int64_t>()[i] = begin - end;
    ops::rope_angles(angles, shift, config_.rope_theta);
    for (size_t l = 0; l < cache.k.size(); ++l) {
        for (Tensor* t : {&cache.k[l], &cache.v[l]}) {
            for (int64_t h = 0; h < t->size(0); ++h) {
                Tensor head = t->slice(0, h, h + 1);
                std::memmove(head.slice(1, begin, begin + moved).base, head.slice(1, end, n).base,
                             bytes_of(t->dtype, moved * hd));
                if (t == &cache.k[l] && moved > 0) {
                    Tensor keys = head.slice(1, begin, begin + moved);  // as [moved, 1 head, hd] for rope
                    keys.shape = {moved, 1, hd};
                    keys.strides = {hd, hd, 1};
                    ops::rope(keys, keys, angles);
                }
            }
        }
    }
    cache.tokens.erase(cache.tokens.begin() + begin, cache.tokens.begin() + end);
}

size_t Qwen2::weight_bytes() const {
    size_t total = embed_tokens.nbytes() + final_norm.nbytes() + lm_head.nbytes();
    for (const Qwen2Layer& l : layers)
        total += l.attn_norm.nbytes() + l.qkv.nbytes() + l.qkv_bias.nbytes() + l.o.nbytes() + l.ffn_norm.nbytes() +
                 l.gate_up.nbytes() + l.down.nbytes();
    return total;
}

size_t Qwen2::decode_bytes() const { return weight_bytes() - embed_tokens.nbytes(); }

Qwen2::Workspace& Qwen2::workspace(int64_t M) {
    const int64_t D = config_.hidden_size, hd = config_.head_dim;
    const int64_t H_l = shard_.head_end - shard_.head_begin, KV_l = shard_.kv_end - shard_.kv_begin;
    const int64_t F_l = shard_.ffn_end - shard_.ffn_begin;
    if (ws_.x.shape.empty()) {
        ws_.x = Tensor::empty({kChunkTokens, D}, DType::F32);
        ws_.h = Tensor::empty({kChunkTokens, D}, DType::F32);
        ws_.partial = Tensor::empty({kChunkTokens, D}, DType::F32);
        ws_.fixed = Tensor::empty({kChunkTokens, D}, DType::I64);
        ws_.qkv = Tensor::empty({kChunkTokens, (H_l + 2 * KV_l) * hd}, DType::F32);
        ws_.attn = Tensor::empty({kChunkTokens, H_l, hd}, DType::F32);
        ws_.gate_up = Tensor::empty({kChunkTokens, 2 * F_l}, DType::F32);
        ws_.act = Tensor::empty({kChunkTokens, F_l}, DType::F32);
        ws_.ids = Tensor::empty({kChunkTokens}, DType::I32);
        ws_.positions = Tensor::empty({kChunkTokens}, DType::I64);
        ws_.angles = Tensor::empty({kChunkTokens, hd}, DType::F32);
    }
    // Views of the first M rows of each buffer.
    current_ = {ws_.x.slice(0, 0, M), ws_.h.slice(0, 0, M), ws_.partial.slice(0, 0, M), ws_.fixed.slice(0, 0, M),
                ws_.qkv.slice(0, 0, M), ws_.attn.slice(0, 0, M), ws_.gate_up.slice(0, 0, M), ws_.act.slice(0, 0, M),
                ws_.ids.slice(0, 0, M), ws_.positions.slice(0, 0, M), ws_.angles.slice(0, 0, M)};
    return current_;
}

// x += in W^T summed over all shards: the row-parallel half of each block (o_proj, down_proj).
void Qwen2::add_reduced_projection(Workspace& ws, const Tensor& in, const ops::PackedWeight& w, int64_t k_block) {
    if (options_.reduction == Reduction::Exact) {
        std::memset(ws.fixed.base, 0, ws.fixed.nbytes());
        ops::linear_fixed(ws.fixed, in, w, k_block);
        if (all_reduce_) all_reduce_(ws.fixed);
        ops::add_from_fixed(ws.x, ws.fixed);
    } else {
        ops::linear(ws.partial, in, w, nullptr);
        if (all_reduce_) all_reduce_(ws.partial);
        ops::add(ws.x, ws.x, ws.partial);
    }
}

void Qwen2::attention_block(Workspace& ws, const Qwen2Layer& layer, const std::vector<Segment>& segments,
                            int64_t layer_index) {
    const int64_t M = ws.x.size(0), hd = config_.head_dim;
    const int64_t H_l = shard_.head_end - shard_.head_begin, KV_l = shard_.kv_end - shard_.kv_begin;

    ops::rms_norm(ws.h, ws.x, layer.attn_norm, config_.rms_eps);
    ops::linear(ws.qkv, ws.h, layer.qkv, &layer.qkv_bias);
    Tensor q = heads_view(ws.qkv, 0, H_l, hd);
    Tensor k = heads_view(ws.qkv, H_l * hd, KV_l, hd);
    Tensor v = heads_view(ws.qkv, (H_l + KV_l) * hd, KV_l, hd);
    ops::rope(q, q, ws.angles);
    ops::rope(k, k, ws.angles);

    for (const Segment& s : segments) {
        KVCache& cache = *s.cache;
        // Store the segment's new keys and values at positions n_past.. of every held cache head.
        for (const Tensor* src : {&k, &v}) {
            const Tensor& cache_t = (src == &k ? cache.k : cache.v)[layer_index];
            Tensor dst = cache_t.slice(1, s.n_past, s.n_past + s.rows);
            dst.shape = {s.rows, KV_l, hd};
            dst.strides = {cache_t.strides[1], cache_t.strides[0], 1};
            copy(dst, src->slice(0, s.row, s.row + s.rows));
        }
        Tensor out = ws.attn.slice(0, s.row, s.row + s.rows);
        ops::self_attention(out, q.slice(0, s.row, s.row + s.rows), cache.k[layer_index], cache.v[layer_index],
                            kv_head_of, s.n_past, 1.0f / std::sqrt(static_cast<float>(hd)));
    }
    add_reduced_projection(ws, ws.attn.view({M, H_l * hd}), layer.o, hd);
}

void Qwen2::mlp_block(Workspace& ws, const Qwen2Layer& layer) {
    const int64_t F_l = shard_.ffn_end - shard_.ffn_begin;
    ops::rms_norm(ws.h, ws.x, layer.ffn_norm, config_.rms_eps);
    ops::linear(ws.gate_up, ws.h, layer.gate_up, nullptr);
    ops::swiglu(ws.act, ws.gate_up.slice(1, 0, F_l), ws.gate_up.slice(1, F_l, 2 * F_l));
    add_reduced_projection(ws, ws.act, layer.down, options_.ffn_block);
}

void Qwen2::check_cache(const KVCache& cache, int64_t new_tokens) const {
    LLAISYS_CHECK(static_cast<int64_t>(cache.k.size()) == config_.n_layer, "cache belongs to another model");
    LLAISYS_CHECK(static_cast<int64_t>(cache.tokens.size()) + new_tokens <= cache.capacity,
                  "tokens exceed the cache capacity");
}

void Qwen2::run_chunk(Workspace& ws, const std::vector<Segment>& segments) {
    for (const Segment& s : segments)
        for (int64_t m = 0; m < s.rows; ++m) ws.positions.data<int64_t>()[s.row + m] = s.n_past + m;
    ops::rope_angles(ws.angles, ws.positions, config_.rope_theta);
    // The embedding table is vocab-parallel: the one rank holding a token's row contributes it
    // and the others add zeros, so this f32 sum is exact for any rank count.
    ops::embedding(ws.x, ws.ids, embed_tokens, shard_.vocab_begin);
    if (all_reduce_) all_reduce_(ws.x);
    for (int64_t i = 0; i < config_.n_layer; ++i) {
        attention_block(ws, layers[i], segments, i);
        mlp_block(ws, layers[i]);
    }
    for (const Segment& s : segments) {
        const int32_t* ids = ws.ids.data<int32_t>() + s.row;
        s.cache->tokens.insert(s.cache->tokens.end(), ids, ids + s.rows);
    }
}

void Qwen2::logits_of(Tensor& out, const Tensor& rows) {
    Tensor h = ws_.h.slice(0, 0, rows.size(0));
    ops::rms_norm(h, rows, final_norm, config_.rms_eps);
    ops::linear(out, h, lm_head, nullptr);
}

void Qwen2::begin_step() {
    LLAISYS_CHECK(loaded_, "the model's weights are not all loaded (finish_loading)");
#ifdef _OPENMP
    omp_set_num_threads(options_.threads);
#endif
}

Tensor Qwen2::forward(KVCache& cache, const std::vector<int32_t>& tokens, bool all_positions) {
    const int64_t M = static_cast<int64_t>(tokens.size());
    begin_step();
    LLAISYS_CHECK(M > 0, "forward needs at least one token");
    check_cache(cache, M);
    const int64_t V_l = shard_.vocab_end - shard_.vocab_begin;
    Tensor logits = Tensor::empty({all_positions ? M : 1, V_l}, DType::F32);
    // Long prompts run in chunks: activations stay small and the workspace is reused.
    for (int64_t begin = 0; begin < M; begin += kChunkTokens) {
        const int64_t end = std::min(M, begin + kChunkTokens), n = end - begin;
        Workspace& ws = workspace(n);
        std::memcpy(ws.ids.base, tokens.data() + begin, n * sizeof(int32_t));
        run_chunk(ws, {{&cache, 0, n, static_cast<int64_t>(cache.tokens.size())}});
        if (!all_positions && end < M) continue;  // only the last position's logits are wanted
        Tensor out = all_positions ? logits.slice(0, begin, end) : logits;
        logits_of(out, all_positions ? ws.x : ws.x.slice(0, n - 1, n));
    }
    return logits;
}

Tensor Qwen2::forward_batch(const std::vector<KVCache*>& caches, const std::vector<std::vector<int32_t>>& tokens) {
    const int64_t B = static_cast<int64_t>(caches.size());
    begin_step();
    LLAISYS_CHECK(B > 0 && static_cast<int64_t>(tokens.size()) == B, "forward_batch: one token list per cache");
    std::vector<Segment> segments;
    int64_t M = 0;
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t c = 0; c < b; ++c) LLAISYS_CHECK(caches[c] != caches[b], "forward_batch: a cache appears twice");
        const int64_t n = static_cast<int64_t>(tokens[b].size());
        LLAISYS_CHECK(n > 0, "forward_batch: every sequence needs a token");
        check_cache(*caches[b], n);
        segments.push_back({caches[b], M, n, static_cast<int64_t>(caches[b]->tokens.size())});
        M += n;
    }
    LLAISYS_CHECK(M <= kChunkTokens, "forward_batch takes at most " + std::to_string(kChunkTokens) + " tokens in all");
    Workspace& ws = workspace(M);
    for (int64_t b = 0; b < B; ++b)
        std::memcpy(ws.ids.data<int32_t>() + segments[b].row, tokens[b].data(), segments[b].rows * sizeof(int32_t));
    run_chunk(ws, segments);
    // Each sequence's last position, gathered (the residual rows are free once the chunk has run).
    const int64_t D = config_.hidden_size;
    Tensor last = ws_.partial.slice(0, 0, B);
    for (int64_t b = 0; b < B; ++b)
        std::memcpy(last.data<float>() + b * D, ws.x.data<float>() + (segments[b].row + segments[b].rows - 1) * D,
                    D * sizeof(float));
    Tensor logits = Tensor::empty({B, shard_.vocab_end - shard_.vocab_begin}, DType::F32);
    logits_of(logits, last);
    return logits;
}

}  // namespace llaisys
