"""GGUF (llama.cpp's format) -> a Hugging Face-style folder: config, safetensors, tokenizer, template.

Quantised tensors are dequantised with the `gguf` package's numpy code (every type it handles) and
stored as bf16 or f32; the embedded vocabulary and merges become a `tokenizers` tokenizer.json.
Neither torch nor transformers is needed.
"""
import json
from pathlib import Path

import numpy as np
import safetensors
from tqdm import tqdm

from ..errors import LlaisysError
from .config import ModelConfig
from .weights import LM_HEAD, model_weights

SHARD_BYTES = 1 << 30  # safetensors files of at most ~1 GiB keep conversion memory bounded

# Qwen2's pre-tokenizer split, as in its Hugging Face tokenizer.json.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

def convert_gguf(gguf_path: Path, out: Path, dtype: str = "bf16") -> None:
    """Write config.json, generation_config.json, tokenizer files and safetensors shards into `out`."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:  # the reader raises many types on a damaged file
        raise LlaisysError(f"{gguf_path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = _Metadata(reader, gguf_path)
    if meta.get("general.architecture") != "qwen2":
        raise LlaisysError(f"{gguf_path}: unsupported architecture {meta.get('general.architecture')!r} (supported: qwen2)")
    tokens = meta.need("tokenizer.ggml.tokens")
    config = _config(meta, tied=LM_HEAD.gguf not in {t.name for t in reader.tensors}, vocab_size=len(tokens))
    names = _hf_names(reader.tensors, ModelConfig.from_dict(config, source=str(gguf_path)), gguf_path)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(meta, out)
    _write_weights(reader, names, out, dtype, gguf_path)


class _Metadata:
    """GGUF key/value metadata with one-line errors for what is missing."""

    def __init__(self, reader, path):
        self.fields, self.path = reader.fields, path

    def get(self, key, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key):
        value = self.get(key)
        if value is None:
            raise LlaisysError(f"{self.path}: GGUF metadata lacks {key}")
        return value


def _hf_names(tensors, config: ModelConfig, path: Path) -> list[str]:
    """The Hugging Face name of each GGUF tensor, by the weight table."""
    known = {w.gguf_name: w.hf_name for w in model_weights(config)}
    for t in tensors:
        if t.name not in known:
            raise LlaisysError(f"{path}: unexpected tensor {t.name} for a qwen2 model")
    return [known[t.name] for t in tensors]


def _config(meta: _Metadata, tied: bool, vocab_size: int) -> dict:
    arch = "qwen2"
    n_head = int(meta.need(f"{arch}.attention.head_count"))
    hidden = int(meta.need(f"{arch}.embedding_length"))
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(meta.need(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.need(f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 32768)),
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "use_sliding_window": False,
        "torch_dtype": "bfloat16",
    }


def _write_tokenizer(meta: _Metadata, out: Path) -> None:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise LlaisysError(f"{meta.path}: tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported (byte-level BPE only)")
    tokens = meta.need("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.need("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, dropout=None,
                                     unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # Token types: 3 = control (special, like <|im_end|>), 4 = user-defined (matched whole, not special).
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == 3])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == 4])
    tokenizer.save(str(out / "tokenizer.json"))

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    eos_ids = [i for i in (meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id"),
                           meta.get("tokenizer.ggml.padding_token_id")) if i is not None]
    tokenizer_config = {
        "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"), "pad_token": token("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    # Chat models end a turn with eos (<|im_end|>) and a document with padding's <|endoftext|>.
    generation_config = {"eos_token_id": list(dict.fromkeys(eos_ids)), "bos_token_id": meta.get("tokenizer.ggml.bos_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))


def _write_weights(reader, names: list[str], out: Path, dtype: str, path: Path) -> None:
    from gguf.quants import dequantize

    shards, current, size = [], [], 0
    for tensor, name in zip(reader.tensors, names):
        bytes_out = int(np.prod(tensor.shape)) * (2 if dtype == "bf16" else 4)
        if current and size + bytes_out > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((tensor, name))
        size += bytes_out
    shards.append(current)

    weight_map, total_size = {}, 0
    progress = tqdm(total=len(names), desc="llaisys: converting GGUF", unit="tensor", leave=False)
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for tensor, name in shard:
            shape = [int(s) for s in reversed(tensor.shape)]  # GGUF lists dimensions innermost first
            try:
                values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            except Exception as e:
                raise LlaisysError(f"{path}: cannot dequantise {tensor.name} ({tensor.tensor_type.name}): {e}") from None
            arrays[name] = to_bf16_bits(values) if dtype == "bf16" else np.ascontiguousarray(values, dtype=np.float32)
            weight_map[name] = file
            total_size += arrays[name].nbytes
            progress.update()
        save_safetensors(arrays, out / file)
    progress.close()
    index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


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
