"""Where a prompt's time goes: one transformer layer's ops, timed one by one on random weights.

The engine runs these ops, in this order, for every layer of a prompt chunk (native/qwen2.cpp);
timing them alone shows which one stops scaling with threads. The row-parallel projections
(o_proj, down_proj) are timed both ways the engine can run them: exact (fixed-point blocks, the
default) and fast (plain f32). Each thread count runs in its own process (OpenMP's team size is
set at start).

    python bench/prefill_ops.py --shape 0.5b --weights q8_0 --tokens 223 --threads 1 2
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SHAPES = {  # hidden, heads, key/value heads, MLP width (head_dim 64)
    "0.5b": (896, 14, 2, 4864),
    "1.5b": (1536, 12, 2, 8960),
}
HEAD_DIM = 64
FIXED_BLOCK = 64  # the engine's k block for o_proj (head_dim) and down_proj (ffn_block)


def packed(native, rng, n_out: int, n_in: int, weights: str):
    w = rng.standard_normal((n_out, n_in), dtype=np.float32) * 0.02
    dtype = getattr(native.DType, weights.upper())
    if weights in ("bf16", "f32"):
        return native.pack_weight(w, dtype)
    return native.pack_weight(native.QuantizedArray(native.quantize(w, dtype), dtype), dtype)


def median_ms(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def layer_times(shape: str, weights: str, M: int, rounds: int) -> dict[str, float]:
    from llaisys_chat import _native as native
    D, H, KV, F = SHAPES[shape]
    rng = np.random.default_rng(0)
    qkv_w = packed(native, rng, (H + 2 * KV) * HEAD_DIM, D, weights)
    o_w, gate_up_w, down_w = (packed(native, rng, D, H * HEAD_DIM, weights), packed(native, rng, 2 * F, D, weights),
                              packed(native, rng, D, F, weights))
    x = rng.standard_normal((M, D), dtype=np.float32)
    norm_w, bias = np.ones(D, np.float32), np.zeros(qkv_w.n_out, np.float32)
    h, qkv = np.empty_like(x), np.empty((M, qkv_w.n_out), np.float32)
    attn, partial = np.empty((M, H, HEAD_DIM), np.float32), np.empty_like(x)
    fixed = np.zeros((M, D), np.int64)
    gate_up, act = np.empty((M, 2 * F), np.float32), np.empty((M, F), np.float32)
    angles = np.empty((M, HEAD_DIM), np.float32)  # once a step, for every layer
    native.rope_angles(angles, np.arange(M, dtype=np.int64), 1e6)
    q = qkv[:, :H * HEAD_DIM].reshape(M, H, HEAD_DIM)
    k = qkv[:, H * HEAD_DIM:(H + KV) * HEAD_DIM].reshape(M, KV, HEAD_DIM)
    k_cache = rng.standard_normal((KV, M, HEAD_DIM), dtype=np.float32)
    v_cache = rng.standard_normal((KV, M, HEAD_DIM), dtype=np.float32)
    heads = [h_ // (H // KV) for h_ in range(H)]
    attn_in = attn.reshape(M, H * HEAD_DIM)

    def fixed_projection(inp, w):
        fixed[:] = 0
        native.linear_fixed(fixed, inp, w, FIXED_BLOCK)
        native.add_from_fixed(partial, fixed)  # the engine adds into the residual stream

    ops = {
        "rms_norm": lambda: native.rms_norm(h, x, norm_w, 1e-6),
        "qkv_proj": lambda: native.linear(qkv, h, qkv_w, bias),
        "rope q, k": lambda: (native.rope(q, q, angles), native.rope(k, k, angles)),
        "attention": lambda: native.self_attention(attn, q, k_cache, v_cache, heads, 0, HEAD_DIM ** -0.5),
        "o_proj exact": lambda: fixed_projection(attn_in, o_w),
        "o_proj fast": lambda: native.linear(partial, attn_in, o_w, None),
        "add": lambda: native.add(x, x, partial),
        "gate_up_proj": lambda: native.linear(gate_up, h, gate_up_w, None),
        "swiglu": lambda: native.swiglu(act, gate_up[:, :F], gate_up[:, F:]),
        "down_proj exact": lambda: fixed_projection(act, down_w),
        "down_proj fast": lambda: native.linear(partial, act, down_w, None),
    }
    return {name: median_ms(fn, rounds) for name, fn in ops.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="0.5b")
    parser.add_argument("--weights", default="q8_0", choices=["q8_0", "q4_0", "bf16", "f32"])
    parser.add_argument("--tokens", type=int, default=223, help="prompt tokens in the chunk (at most 256)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(layer_times(args.shape, args.weights, args.tokens, args.rounds)))
        return

    from common import machine, table
    columns = {}
    for threads in args.threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="close", OMP_PLACES="cores")
        out = subprocess.run([sys.executable, __file__, "--worker", *sys.argv[1:]], env=env, check=True,
                             capture_output=True, text=True).stdout
        columns[threads] = json.loads(out.strip().splitlines()[-1])
    print(f"Machine: {machine()}; {args.shape} shape, {args.weights}, {args.tokens} tokens; "
          f"ms per layer, medians of {args.rounds}")
    first = args.threads[0]
    headers = ["op"] + [f"{t} threads ms" for t in args.threads] + [f"speedup {t} vs {first}" for t in args.threads[1:]]
    names = list(columns[first])
    rows = [[n] + [columns[t][n] for t in args.threads] + [columns[first][n] / columns[t][n] for t in args.threads[1:]]
            for n in names]
    for mode in ("exact", "fast"):
        layer = [n for n in names if not n.endswith("exact" if mode == "fast" else "fast")]
        total = {t: sum(columns[t][n] for n in layer) for t in args.threads}
        rows.append([f"layer ({mode})"] + [total[t] for t in args.threads] + [total[first] / total[t] for t in args.threads[1:]])
    print(table(headers, rows))


if __name__ == "__main__":
    main()
