"""A GGUF file (llama.cpp's format) as a model folder: config.json, the tokenizer, its chat template
and generation config from the file's metadata, and the file itself linked as model.gguf, whose
tensors the engine reads in place (checkpoint.py). The embedded vocabulary and merges become a
`tokenizers` tokenizer.json; neither torch nor transformers is needed.
"""
import json
from pathlib import Path

from ..errors import LlaisysError
from .checkpoint import GGUF_FILE
from .config import ModelConfig
from .gguf_file import GGUFFile
from .weights import LM_HEAD, model_weights

# Qwen2's pre-tokenizer split, as in its Hugging Face tokenizer.json.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

def write_gguf_folder(gguf_path: Path, out: Path) -> None:
    """Write config.json, generation_config.json and the tokenizer files into `out`, and link the GGUF."""
    gguf = GGUFFile(gguf_path)
    meta = _Metadata(gguf.metadata, gguf_path)
    if meta.get("general.architecture") != "qwen2":
        raise LlaisysError(f"{gguf_path}: unsupported architecture {meta.get('general.architecture')!r} (supported: qwen2)")
    tokens = meta.need("tokenizer.ggml.tokens")
    config = _config(meta, tied=LM_HEAD.gguf not in gguf.tensors, vocab_size=len(tokens))
    _check_names(gguf.tensors, ModelConfig.from_dict(config, source=str(gguf_path)), gguf_path)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(meta, out)
    (out / GGUF_FILE).symlink_to(Path(gguf_path).resolve())


class _Metadata:
    """GGUF key/value metadata with one-line errors for what is missing."""

    def __init__(self, fields: dict, path):
        self.fields, self.path = fields, path

    def get(self, key, default=None):
        return self.fields.get(key, default)

    def need(self, key):
        value = self.get(key)
        if value is None:
            raise LlaisysError(f"{self.path}: GGUF metadata lacks {key}")
        return value


def _check_names(names, config: ModelConfig, path: Path) -> None:
    """Every tensor of the file is one the weight table knows."""
    if config.num_hidden_layers > len(names):  # every layer has tensors: this bounds the table built below
        raise LlaisysError(f"{path}: {config.num_hidden_layers} layers in the metadata, but only {len(names)} tensors")
    known = {w.gguf_name for w in model_weights(config)}
    for name in names:
        if name not in known:
            raise LlaisysError(f"{path}: unexpected tensor {name} for a qwen2 model")


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
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
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
