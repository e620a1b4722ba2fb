// The Qwen2 decoder: weights, key/value cache and the forward pass of one tensor-parallel shard.
// The model knows which slice it holds (Shard) but nothing about processes: the sums that join
// the slices go through one all_reduce hook supplied by the caller.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "ops.hpp"
#include "tensor.hpp"

namespace llaisys {

struct Qwen2Config {
    int64_t vocab_size = 0;
    int64_t hidden_size = 0;  // D
    int64_t n_layer = 0;
    int64_t n_head = 0;
    int64_t n_head_kv = 0;
    int64_t head_dim = 0;
    int64_t ffn_size = 0;     // F, the MLP's intermediate size
    float rope_theta = 10000.0f;
    float rms_eps = 1e-6f;
};

// What this process holds: query heads [head_begin, head_end), the key/value heads they read,
// MLP columns [ffn_begin, ffn_end) and vocabulary rows [vocab_begin, vocab_end).
// A single process holds everything.
struct Shard {
    int64_t head_begin = 0, head_end = 0;
    int64_t kv_begin = 0, kv_end = 0;
    int64_t ffn_begin = 0, ffn_end = 0;
    int64_t vocab_begin = 0, vocab_end = 0;
};

// How row-parallel partial sums are joined: Exact (fixed point, identical for any rank count)
// or Fast (f32 sums, whose rounding depends on how many ranks there are).
enum class Reduction { Exact, Fast };

struct Qwen2Options {
    DType cache = DType::BF16;    // key/value cache dtype: BF16 or F32
    int threads = 1;
    Reduction reduction = Reduction::Exact;
    int64_t ffn_block = 64;       // down_proj's fixed-point block; shard bounds are multiples of it
};

// The weights a model loads, one tensor at a time: this shard's slice of each checkpoint tensor, as
// stored there (matrices [out, in]); which slice is the weight table in llaisys_chat/model/weights.py.
//   EmbedTokens, LmHead [V_l, D]; FinalNorm, AttnNorm, FfnNorm [D];
//   Q [H_l * head_dim, D], K and V [KV_l * head_dim, D] (with optional biases of their rows);
//   O [D, H_l * head_dim]; Gate and Up [F_l, D]; Down [D, F_l].
enum class Slot : uint8_t { EmbedTokens, FinalNorm, LmHead, AttnNorm, Q, QBias, K, KBias, V, VBias, O, FfnNorm, Gate, Up, Down };

// In-place sum of a contiguous f32 or i64 tensor over the ranks that hold the other shards.
using AllReduce = std::function<void(Tensor&)>;

struct KVCache {
    std::vector<Tensor> k, v;     // per layer: [kv heads held, capacity, head_dim]
    std::vector<int32_t> tokens;  // the ids whose keys and values are stored, in order
    int64_t capacity = 0;
    void truncate(int64_t n_tokens);
    size_t nbytes() const;
};

struct Qwen2Layer {
    Tensor attn_norm;            // [D]
    ops::PackedWeight q, k, v;   // while loading; fused into qkv once all are in
    ops::PackedWeight qkv;       // [(H_l + 2 KV_l) * head_dim, D]: q, k, v rows of the held heads
    Tensor q_bias, k_bias, v_bias;  // while loading (each optional)
    Tensor qkv_bias;             // [(H_l + 2 KV_l) * head_dim] f32
    ops::PackedWeight o;         // [D, H_l * head_dim]: o_proj columns of the held heads
    Tensor ffn_norm;             // [D]
    ops::PackedWeight gate, up;  // while loading
    ops::PackedWeight gate_up;   // [2 F_l, D]: gate rows then up rows of the held columns
    ops::PackedWeight down;      // [D, F_l]
};

class Qwen2 {
  public:
    Qwen2(const Qwen2Config& config, const Shard& shard, const Qwen2Options& options, AllReduce all_reduce);

    // Loads one weight (`layer` is ignored for the global ones) into its packed place in `dtype`:
    // matrices and the embedding table in BF16, F32 or a quantized type (ops::pack_weight), norms
    // and biases in f32. The source is not referenced afterwards, so its memory can be released.
    void load(Slot slot, int64_t layer, const Tensor& w, DType dtype);
    // Checks that every weight has been loaded (biases are optional) and fuses the projections;
    // the model can run from then on.
    void finish_loading();

    KVCache new_cache(int64_t capacity) const;
    // Removes positions [begin, end) from the cache: the later keys and values move down and the
    // keys turn back by end - begin positions, so that the cache holds what running the shorter
    // sequence would have (but for rounding). Long conversations drop their oldest messages so.
    void drop_from_cache(KVCache& cache, int64_t begin, int64_t end) const;
    // Runs `tokens` after those already in the cache, appends them to it, and returns the logits
    // of this shard's vocabulary rows: [1, V_l] for the last position, or [M, V_l] for all.
    Tensor forward(KVCache& cache, const std::vector<int32_t>& tokens, bool all_positions);
    // Several sequences at once: tokens[b] continues caches[b] (all different), a decode step's one
    // token or a prompt's, up to kChunkTokens in all. The weights are read once for all of them;
    // each attends to its own cache. Returns [B, V_l]: row b holds the logits of sequence b's last
    // position, the same as forward(*caches[b], tokens[b]) would give.
    Tensor forward_batch(const std::vector<KVCache*>& caches, const std::vector<std::vector<int32_t>>& tokens);

    static constexpr int64_t kChunkTokens = 256;  // rows of activations computed at once

    const Qwen2Config& config() const { return config_; }
    const Shard& shard() const { return shard_; }
    size_t weight_bytes() const;
    size_t decode_bytes() const;  // what one decode step reads: the weights but the embedding table

  private:
    // Activations of one chunk of tokens. Buffers are allocated once for kChunkTokens rows and
    // reused: allocations this large would otherwise come fresh from mmap and fault on every call.
    struct Workspace {
        Tensor x;        // [M, D] the residual stream
        Tensor h;        // [M, D] normalised input of a block
        Tensor partial;  // [M, D] a row-parallel projection, summed over shards
        Tensor fixed;    // [M, D] i64 the same in fixed point, before the sum
        Tensor qkv;      // [M, (H_l + 2 H_kv_l) * head_dim]
        Tensor attn;     // [M, H_l, head_dim]
        Tensor gate_up;  // [M, 2 F_l]
        Tensor act;      // [M, F_l]
        Tensor ids;      // [M] i32
        Tensor positions;  // [M] i64
        Tensor angles;     // [M, head_dim] rotary cosines and sines of the positions
    };
    // Rows [row, row + rows) of a chunk continue one sequence, whose cache holds n_past tokens.
    struct Segment {
        KVCache* cache;
        int64_t row, rows, n_past;
    };
    Workspace& workspace(int64_t M);  // views of the first M rows
    void begin_step();
    void check_cache(const KVCache& cache, int64_t new_tokens) const;
    // Runs the chunk's tokens (ws.ids) through every layer, appending each segment's to its cache.
    void run_chunk(Workspace& ws, const std::vector<Segment>& segments);
    void logits_of(Tensor& out, const Tensor& rows);  // final norm and lm_head of residual rows
    void attention_block(Workspace& ws, const Qwen2Layer& layer, const std::vector<Segment>& segments,
                         int64_t layer_index);
    void mlp_block(Workspace& ws, const Qwen2Layer& layer);
    void add_reduced_projection(Workspace& ws, const Tensor& in, const ops::PackedWeight& w, int64_t k_block);

    Qwen2Config config_;
    Shard shard_;
    Qwen2Options options_;
    AllReduce all_reduce_;
    bool loaded_ = false;
    Tensor embed_tokens;          // [V_l, D], in the dtype it was loaded in
    std::vector<Qwen2Layer> layers;
    Tensor final_norm;            // [D]
    ops::PackedWeight lm_head;    // [V_l, D]; packed from embed_tokens when tied (never loaded)
    std::vector<int64_t> kv_head_of;  // held query head -> held cache head
    Workspace ws_;       // full-size buffers
    Workspace current_;  // views of them for the chunk being computed
};

}  // namespace llaisys
