"""The model's hyper-parameters, read from a Hugging Face `config.json`."""
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlaisysError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to know about a Qwen2 checkpoint."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        """Parse and check config.json; every problem is a one-line LlaisysError."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise LlaisysError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LlaisysError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise LlaisysError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ModelConfig":
        """Build from config.json's contents, accepting both the classic and the newer key names."""
        architectures = raw.get("architectures") or []
        if raw.get("model_type") != "qwen2" and not set(architectures) & set(SUPPORTED_ARCHITECTURES):
            named = ", ".join(architectures) or raw.get("model_type") or "none"
            raise LlaisysError(f"{source}: unsupported architecture {named} (supported: Qwen2ForCausalLM)")

        def need(key, kind=int):
            if key not in raw:
                raise LlaisysError(f"{source}: missing {key!r}")
            value = raw[key]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise LlaisysError(f"{source}: {key!r} must be a positive integer, got {value!r}")
            if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
                raise LlaisysError(f"{source}: {key!r} must be a positive number, got {value!r}")
            return kind(value)

        n_head = need("num_attention_heads")
        hidden = need("hidden_size")
        n_head_kv = need("num_key_value_heads") if "num_key_value_heads" in raw else n_head
        head_dim = need("head_dim") if raw.get("head_dim") is not None else hidden // n_head
        if n_head % n_head_kv:
            raise LlaisysError(f"{source}: num_attention_heads ({n_head}) is not a multiple of num_key_value_heads ({n_head_kv})")
        if head_dim % 2:
            raise LlaisysError(f"{source}: head_dim ({head_dim}) must be even for rotary embeddings")
        intermediate = need("intermediate_size")
        if intermediate % 2:
            raise LlaisysError(f"{source}: intermediate_size ({intermediate}) must be even")
        if raw.get("use_sliding_window"):
            raise LlaisysError(f"{source}: sliding-window attention is not supported")
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=n_head,
            num_key_value_heads=n_head_kv,
            head_dim=head_dim,
            max_position_embeddings=need("max_position_embeddings") if "max_position_embeddings" in raw else 32768,
            rms_norm_eps=need("rms_norm_eps", float) if "rms_norm_eps" in raw else 1e-6,
            rope_theta=_rope_theta(raw, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )


def _rope_theta(raw: dict, source: str) -> float:
    """The rotary base from `rope_theta` (classic) or `rope_parameters` (transformers 5)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise LlaisysError(f"{source}: rope_parameters must be an object")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise LlaisysError(f"{source}: rope type {rope_type!r} is not supported (only the default)")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise LlaisysError(f"{source}: rope_theta must be a positive number, got {theta!r}")
    return float(theta)
