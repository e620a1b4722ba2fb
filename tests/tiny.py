"""Tiny random Qwen2 checkpoints written by the tests: real files, any head layout, seconds to run."""
import json
from pathlib import Path

import numpy as np
import safetensors
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """f32 -> bf16 bits (as uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def save_safetensors(arrays: dict[str, np.ndarray], file: Path) -> None:
    """Write numpy arrays to a safetensors file; uint16 arrays are stored as BF16 bits."""
    specs = {
        name: safetensors.TensorSpec(dtype="bfloat16" if a.dtype == np.uint16 else a.dtype.name, shape=list(a.shape),
                                     data_ptr=a.ctypes.data, data_len=a.nbytes)
        for name, a in arrays.items()
    }
    safetensors.serialize_file(specs, str(file), metadata={"format": "pt"})


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: 256 byte tokens, then the chat specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tokenizer


def write_tiny_model(folder: Path, *, layers=2, hidden=32, heads=4, kv_heads=2, head_dim=None, ffn=64,
                     tied=False, dtype="f32", seed=0, rope_key="rope_theta", sharded=False) -> Path:
    """A random Qwen2 checkpoint with config, tokenizer and chat template; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_tokenizer()
    vocab = tokenizer.get_vocab_size()
    head_dim = head_dim or hidden // heads
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale / np.sqrt(shape[-1])).astype(np.float32)

    weights = {"model.embed_tokens.weight": rand(vocab, hidden, scale=4.0),
               "model.norm.weight": 1 + 0.1 * rng.standard_normal(hidden).astype(np.float32)}
    if not tied:
        weights["lm_head.weight"] = rand(vocab, hidden, scale=4.0)
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": 1 + 0.1 * rng.standard_normal(hidden).astype(np.float32),
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden, scale=2.0),
            p + "self_attn.q_proj.bias": 0.1 * rng.standard_normal(heads * head_dim).astype(np.float32),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden, scale=2.0),
            p + "self_attn.k_proj.bias": 0.1 * rng.standard_normal(kv_heads * head_dim).astype(np.float32),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.bias": 0.1 * rng.standard_normal(kv_heads * head_dim).astype(np.float32),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "post_attention_layernorm.weight": 1 + 0.1 * rng.standard_normal(hidden).astype(np.float32),
            p + "mlp.gate_proj.weight": rand(ffn, hidden),
            p + "mlp.up_proj.weight": rand(ffn, hidden),
            p + "mlp.down_proj.weight": rand(hidden, ffn),
        })
    stored = {k: to_bf16_bits(v) if dtype == "bf16" else v for k, v in weights.items()}
    if sharded:
        names = sorted(stored)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, part in halves.items():
            save_safetensors({n: stored[n] for n in part}, folder / file)
        weight_map = {n: f for f, part in halves.items() for n in part}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_safetensors(stored, folder / "model.safetensors")

    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 512,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": tied, "hidden_act": "silu"}
    if head_dim != hidden // heads:
        config["head_dim"] = head_dim
    if rope_key == "rope_theta":
        config["rope_theta"] = 10000.0
    else:  # transformers 5 style
        config["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    im_end = tokenizer.token_to_id("<|im_end|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end]}))
    return folder


def load_weights_f64(folder: Path) -> dict[str, np.ndarray]:
    """The stored weights of a tiny model as float64 by Hugging Face name (bf16 bits widened)."""
    from llaisys_chat.model.checkpoint import Checkpoint
    from llaisys_chat.model.config import ModelConfig
    from llaisys_chat.model.weights import model_weights

    checkpoint = Checkpoint(folder)
    out = {}
    for weight in model_weights(ModelConfig.from_file(Path(folder) / "config.json")):
        if weight in checkpoint:
            a = np.asarray(checkpoint.tensor(weight).data)
            wide = (a.astype(np.uint32) << 16).view(np.float32) if a.dtype == np.uint16 else a
            out[weight.hf_name] = wide.astype(np.float64)
    return out


# A tiny GGUF in every type the engine computes in natively, placed as a quantized llama.cpp file
# would place them (row-parallel o_proj and down_proj split on their own blocks).
GGUF_TYPES = {"token_embd": "Q4_0", "output": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q5_0", "attn_v": "Q8_0",
              "attn_output": "Q5_0", "ffn_gate": "Q4_K", "ffn_up": "Q8_0", "ffn_down": "Q6_K"}


def random_blocks(qtype: str, rows: int, cols: int, rng) -> np.ndarray:
    """uint8 [rows, row bytes] of valid blocks of a GGUF type: random integers, f16 scales that keep
    a row's dot products near 1."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    blocks = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    scale = (0.5 if qtype in ("Q8_0", "Q4_0", "Q5_0") else 0.05) / np.sqrt(cols)

    d = rng.uniform(0.2, 1.0, len(blocks)) * scale

    def f16(values):
        return np.asarray(values, np.float16).view(np.uint8).reshape(-1, 2)

    if qtype == "Q6_K":  # d ends the block
        blocks[:, -2:] = f16(d)
    else:  # d leads the block; Q4_K's dmin follows it, sized so that values are about zero on average
        blocks[:, 0:2] = f16(d)
        if qtype == "Q4_K":
            blocks[:, 2:4] = f16(7.5 * d)
    return blocks.reshape(rows, -1)


def write_tiny_gguf(path: Path, *, layers=2, hidden=256, heads=4, kv_heads=2, ffn=1024, seed=0, types=None) -> Path:
    """A random Qwen2 GGUF (types as in GGUF_TYPES unless given) with the byte tokenizer and chat template."""
    types = types or GGUF_TYPES
    from gguf import GGMLQuantizationType, GGUFWriter

    rng = np.random.default_rng(seed)
    tokenizer = byte_tokenizer()
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer = GGUFWriter(path, "qwen2")
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges([])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_chat_template(TEMPLATE)
    hd = hidden // heads
    shapes = {"token_embd": (len(tokens), hidden), "output": (len(tokens), hidden), "attn_q": (heads * hd, hidden),
              "attn_k": (kv_heads * hd, hidden), "attn_v": (kv_heads * hd, hidden), "attn_output": (hidden, heads * hd),
              "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}

    def matrix(name, kind):
        writer.add_tensor(f"{name}.weight", random_blocks(types[kind], *shapes[kind], rng),
                          raw_dtype=GGMLQuantizationType[types[kind]])

    def vector(name, n, around):
        writer.add_tensor(name, (around + 0.1 * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd", "token_embd")
    matrix("output", "output")
    vector("output_norm.weight", hidden, 1.0)
    for i in range(layers):
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            matrix(f"blk.{i}.{kind}", kind)
        for kind in ("attn_q", "attn_k", "attn_v"):
            vector(f"blk.{i}.{kind}.bias", shapes[kind][0], 0.0)
        vector(f"blk.{i}.attn_norm.weight", hidden, 1.0)
        vector(f"blk.{i}.ffn_norm.weight", hidden, 1.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
