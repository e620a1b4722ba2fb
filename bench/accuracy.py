"""Accuracy of each weight type against the f32 engine, with llama.cpp's own measurement as the anchor.

A fixed text (bench/data/kl_text.txt, CPython's textwrap.py) is cut into chunks of 512 tokens and
each chunk is run teacher-forced; as llama-perplexity --kl-divergence does, the second half of each
chunk is scored: the mean KL divergence of the type's next-token distribution from the f32 one, and
how often both put the same token first. The f32 reference is the demo's weights dequantized to f32
(our --weights f32; llama-quantize F32 for llama.cpp); each type reads the same GGUF file in both.

    .venv/bin/python bench/accuracy.py [--types q4_k_m q8_0 q4_0 bf16] [--chunks 4]
"""
import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table  # noqa: E402
from engine_speed import gguf_of  # noqa: E402
from llama_cpp import llama_bin, same_weights_gguf  # noqa: E402

from llaisys_chat.engine import Engine  # noqa: E402
from llaisys_chat.model.builtins import builtin_gguf, find_builtin  # noqa: E402

TEXT = Path(__file__).parent / "data" / "kl_text.txt"
N_CTX = 512


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def scored_log_probs(engine: Engine, chunk: list[int]) -> np.ndarray:
    """Log-probabilities of the next token at the scored positions (the second half) of a chunk."""
    cache = engine.model.new_cache(N_CTX)
    logits = engine.model.forward(cache, chunk, all_positions=True)
    return log_softmax(logits[N_CTX // 2:N_CTX - 1])


def ours(reference: Engine, engine: Engine, chunks: list[list[int]]) -> tuple[float, float]:
    """(mean KL divergence from the reference, share of positions whose top token agrees)."""
    kl, same = [], []
    for chunk in chunks:
        base, got = scored_log_probs(reference, chunk), scored_log_probs(engine, chunk)
        kl.extend((np.exp(base) * (base - got)).sum(axis=-1))
        same.extend(base.argmax(axis=-1) == got.argmax(axis=-1))
    return float(np.mean(kl)), float(np.mean(same))


def llama_cpp(base_logits: Path, gguf: Path, text: Path, chunks: int) -> tuple[float, float]:
    """llama-perplexity's Mean KLD and Same top p on the same text."""
    out = subprocess.run([llama_bin("llama-perplexity"), "-m", gguf, "-f", text, "-c", str(N_CTX), "-t", "2",
                          "--chunks", str(chunks), "--kl-divergence", "--kl-divergence-base", base_logits],
                         capture_output=True, text=True, check=True).stdout
    kld = float(re.search(r"Mean\s+KLD:\s+([-\d.e]+)", out).group(1))
    top = float(re.search(r"Same top p:\s+([\d.]+)", out).group(1)) / 100
    return kld, top


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", nargs="+", default=["q4_k_m", "q8_0", "q4_0", "bf16"])
    p.add_argument("--chunks", type=int, default=4)
    args = p.parse_args()
    demo = builtin_gguf(find_builtin("demo"))
    reference = Engine(demo, weights="f32", threads=2, max_context=N_CTX)
    ids = reference.chat.encode(TEXT.read_text())
    chunks = [ids[i * N_CTX:(i + 1) * N_CTX] for i in range(min(args.chunks, len(ids) // N_CTX))]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "f32.kld"
        subprocess.run([llama_bin("llama-perplexity"), "-m", same_weights_gguf(demo, "F32"), "-f", TEXT, "-c",
                        str(N_CTX), "-t", "2", "--chunks", str(len(chunks)), "--kl-divergence-base", base],
                       capture_output=True, check=True)
        rows = []
        for kind in args.types:
            gguf = gguf_of(kind)
            engine = Engine(gguf, threads=2, max_context=N_CTX)
            kl, top = ours(reference, engine, chunks)
            theirs_kl, theirs_top = llama_cpp(base, gguf, TEXT, len(chunks))
            rows.append([f"{kind} ({engine.weights})", f"{kl:.5f}", f"{theirs_kl:.5f}", 100 * top, 100 * theirs_top])
            del engine
            if kind in ("q8_0", "q4_0"):  # the same type, quantized by us while loading the demo
                engine = Engine(demo, weights=kind, threads=2, max_context=N_CTX)
                kl, top = ours(reference, engine, chunks)
                rows.append([f"{kind} quantized while loading the demo", f"{kl:.5f}", f"{theirs_kl:.5f}", 100 * top,
                             100 * theirs_top])
                del engine
    print(f"Machine: {machine()}; text: {TEXT.name}, {len(chunks)} chunks of {N_CTX} tokens, "
          f"{len(chunks) * (N_CTX // 2 - 1)} scored positions")
    print(table(["weights", "mean KL ours", "mean KL llama.cpp", "same top-1 % ours", "same top-1 % llama.cpp"], rows))


if __name__ == "__main__":
    main()
