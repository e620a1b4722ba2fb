"""A plain numpy Qwen2 forward pass (float64), the reference the engine's logits are checked against."""
import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, theta):
    """NeoX layout: x [M, H, d]; the halves of each head rotate together."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
    angles = positions[:, None] * inv_freq[None, :]  # [M, d/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x0, x1 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)


def attention(q, k, v, n_past):
    """Causal GQA: q [M, H, d] at positions n_past.., k/v [T, H_kv, d] for positions 0..T-1."""
    M, H, d = q.shape
    group = H // k.shape[1]
    out = np.zeros_like(q)
    for h in range(H):
        kh, vh = k[:, h // group], v[:, h // group]
        scores = q[:, h] @ kh.T / np.sqrt(d)  # [M, T]
        mask = np.arange(k.shape[0])[None, :] > (n_past + np.arange(M))[:, None]
        scores = np.where(mask, -np.inf, scores)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ vh
    return out


def qwen2_logits(w, config, tokens):
    """Logits [M, V] of every position of `tokens` (float64)."""
    hd = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    H, Hkv, eps = config["num_attention_heads"], config["num_key_value_heads"], config["rms_norm_eps"]
    theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    tokens = np.asarray(tokens)
    M = len(tokens)
    positions = np.arange(M, dtype=np.float64)
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).reshape(M, H, hd)
        k = (h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).reshape(M, Hkv, hd)
        v = (h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).reshape(M, Hkv, hd)
        a = attention(rope(q, positions, theta), rope(k, positions, theta), v, 0)
        x = x + a.reshape(M, H * hd) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g, u = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T
