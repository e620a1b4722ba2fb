"""The engine on tiny random checkpoints against the numpy reference, and its cache behaviour."""
import json

import numpy as np
import pytest
from reference import qwen2_logits
from tiny import load_weights_f64, write_tiny_gguf

from llaisys_chat.engine import Engine
from llaisys_chat.errors import LlaisysError
from llaisys_chat.protocol.sampling import SamplingParams

SHAPES = [
    dict(layers=2, hidden=32, heads=4, kv_heads=2, ffn=64),                 # GQA, untied
    dict(layers=1, hidden=48, heads=6, kv_heads=6, ffn=96, tied=True),      # MHA, tied embeddings
    dict(layers=3, hidden=42, heads=7, kv_heads=1, ffn=70),                 # odd head count, MQA
    dict(layers=2, hidden=32, heads=2, kv_heads=1, head_dim=24, ffn=40, rope_key="rope_parameters"),
]


def engine_logits(engine, tokens, chunks):
    """All-position logits of `tokens`, fed to the engine in `chunks` (exercises the cache)."""
    cache, out, at = engine.model.new_cache(64), [], 0
    for n in chunks:
        out.append(engine.model.forward(cache, tokens[at:at + n], all_positions=True))
        at += n
    return np.concatenate(out)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s['heads']}kv{s['kv_heads']}{'-tied' if s.get('tied') else ''}")
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_logits_match_numpy_reference(tiny_models, shape, dtype):
    folder = tiny_models(**shape, dtype=dtype)
    config = json.loads((folder / "config.json").read_text())
    tokens = [5, 17, 200, 3, 3, 90, 41, 7, 255, 12, 60]
    expected = qwen2_logits(load_weights_f64(folder), config, tokens)
    engine = Engine(folder, threads=2)
    assert engine.weights == dtype
    for chunks in ([len(tokens)], [4, 1, 1, 5], [1] * len(tokens)):
        got = engine_logits(engine, tokens, chunks)
        # f32 compute differs only in summation order; bf16 also rounds each matmul's input.
        rel = np.abs(got - expected).max() / np.abs(expected).max()
        assert rel < (2e-5 if dtype == "f32" else 3e-2), (chunks, rel)


def test_sharded_checkpoint_loads_like_single_file(tiny_models):
    single = Engine(tiny_models(layers=2, dtype="bf16"))
    sharded = Engine(tiny_models(layers=2, dtype="bf16", sharded=True))
    tokens = [1, 2, 3, 4]
    assert np.array_equal(engine_logits(single, tokens, [4]), engine_logits(sharded, tokens, [4]))


@pytest.mark.parametrize("weights", ["bf16", "q8_0"])
def test_threads_do_not_change_results(tiny_models, weights):
    # Threads split rows and tokens, never a sum: a prompt and then decode steps give the same bits
    # for any count, more threads than a small matrix has units of work included. The MLP is wide
    # enough that a decode step's activations and SwiGLU are cut into column spans too.
    folder = tiny_models(layers=2, hidden=128, heads=4, kv_heads=2, ffn=2560, dtype="bf16")
    tokens = list(range(30, 60))
    chunks = [20, 1, 1, 1, 4, 3]
    one = engine_logits(Engine(folder, threads=1, weights=weights), tokens, chunks)
    for threads in (2, 3, 16):
        assert np.array_equal(engine_logits(Engine(folder, threads=threads, weights=weights), tokens, chunks), one)


def test_multi_turn_cache_reuse_equals_fresh_computation(tiny_models):
    folder = tiny_models(layers=2, dtype="bf16")
    engine = Engine(folder)
    messages = [{"role": "user", "content": "hello there"}]
    first = engine.generate(engine.chat.encode_chat(messages), max_new_tokens=12).run()
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "and again"}]
    prompt = engine.chat.encode_chat(messages)
    second = engine.generate(prompt, max_new_tokens=12).run()
    assert second.stats.cached_tokens > len(first.prompt_ids)  # only the new turn was prefilled
    fresh = Engine(folder).generate(prompt, max_new_tokens=12).run()
    assert fresh.stats.cached_tokens == 0
    assert second.tokens == fresh.tokens


def test_sampling_is_reproducible_with_a_seed(tiny_models):
    engine = Engine(tiny_models(layers=2))
    prompt = engine.chat.encode_chat([{"role": "user", "content": "sample"}])
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=42)
    runs = [engine.generate(prompt, params, max_new_tokens=16, cache_key=k).run().tokens for k in ("a", "b")]
    assert runs[0] == runs[1]
    other = engine.generate(prompt, SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=43), max_new_tokens=16).run()
    assert other.tokens != runs[0]


def test_stop_strings_end_the_reply_and_are_not_shown(tiny_models):
    engine = Engine(tiny_models(layers=2))
    prompt = engine.chat.encode_chat([{"role": "user", "content": "go"}])
    full = engine.generate(prompt, max_new_tokens=20).run()
    stop = full.text[5:8]
    assert len(stop) == 3
    cut = engine.generate(prompt, max_new_tokens=20, stop=(stop,)).run()
    assert cut.stats.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    streamed = "".join(piece for _, piece in engine.generate(prompt, max_new_tokens=20, stop=(stop,)))
    assert streamed == cut.text


def test_context_limit(tiny_models):
    engine = Engine(tiny_models(layers=1), max_context=40)
    long_prompt = engine.chat.encode_chat([{"role": "user", "content": "x" * 60}])
    with pytest.raises(LlaisysError, match=r"the prompt is \d+ tokens but the context holds 40"):
        engine.generate(long_prompt)
    prompt = engine.chat.encode_chat([{"role": "user", "content": "hi"}])
    run = engine.generate(prompt, max_new_tokens=100).run()
    assert run.stats.finish_reason in ("context", "stop")
    assert len(prompt) + len(run.tokens) <= 40 + 1


def test_lru_caches_evict_and_reprefill(tiny_models):
    engine = Engine(tiny_models(layers=1), cache_slots=2)
    prompt = engine.chat.encode_chat([{"role": "user", "content": "remember"}])
    first = engine.generate(prompt, max_new_tokens=5, cache_key="a").run()
    engine.generate(prompt, max_new_tokens=5, cache_key="b").run()
    assert engine.generate(prompt, max_new_tokens=5, cache_key="a").run().stats.cached_tokens == len(prompt) - 1
    engine.generate(prompt, max_new_tokens=5, cache_key="c").run()  # evicts b, the least recently used
    again = engine.generate(prompt, max_new_tokens=5, cache_key="b").run()
    assert again.stats.cached_tokens == 0 and again.tokens == first.tokens



@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_dropping_a_span_from_the_cache_turns_the_keys_after_it_back(tiny_models, dtype):
    """The keys after the dropped span are turned back by RoPE to their new positions. With one layer
    the cache is then what computing without the span gives; deeper layers' cached values still
    carry what their tokens saw of the span (as llama.cpp's context shift and StreamingLLM keep them)."""
    engine = Engine(tiny_models(**{**SHAPES[0], "layers": 1}, dtype=dtype))
    kept, dropped, after, new = [5, 17, 200, 3], [3, 90, 41, 7, 255, 12], [60, 8, 99, 14, 2], [31, 77, 4]
    cache = engine.model.new_cache(64)
    engine.model.forward(cache, kept + dropped + after)
    engine.model.drop_from_cache(cache, len(kept), len(kept) + len(dropped))
    assert list(cache.tokens) == kept + after
    got = engine.model.forward(cache, new, all_positions=True)
    fresh = engine.model.new_cache(64)
    engine.model.forward(fresh, kept + after)
    expected = engine.model.forward(fresh, new, all_positions=True)
    # A bf16 cache rounds the turned keys again: a few per cent of the logits' range on these random weights.
    tolerance = 1e-4 if dtype == "f32" else 0.05 * np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)


def conversation_past_the_context(engine, turns=12):
    """Replies to a growing conversation on one cache; the last reply is the first that both let
    messages go and reused the cache after them."""
    messages, replies = [{"role": "system", "content": "Keep this rule."}], []
    for i in range(turns):
        messages.append({"role": "user", "content": f"message {i} " + "words " * 8})
        run = engine.reply(messages, max_new_tokens=8, cache_key="long").run()
        messages.append({"role": "assistant", "content": run.text})
        replies.append(run)
        if run.stats.dropped_messages and run.stats.cached_tokens > 20:
            return replies
    pytest.fail("the conversation never outgrew the context with its cache reused")


def test_a_conversation_past_the_context_reuses_the_cache_of_what_stays(tiny_models):
    replies = conversation_past_the_context(Engine(tiny_models(**SHAPES[0]), max_context=160))
    last = replies[-1]
    assert last.prompt.startswith("<|im_start|>system\nKeep this rule.") and "message 0 " not in last.prompt
    # The same turns on a fresh engine give the same tokens: trimming depends only on the conversation.
    again = conversation_past_the_context(Engine(tiny_models(**SHAPES[0]), max_context=160), len(replies))
    assert [r.tokens for r in again] == [r.tokens for r in replies]


@pytest.mark.parametrize("weights", ["f32", "bf16", "q8_0", "q4_0", "gguf"])
def test_a_batched_step_gives_each_sequence_what_it_gets_alone(tiny_models, tmp_path, weights):
    if weights == "gguf":  # every quantized type the engine computes in
        engine = Engine(write_tiny_gguf(tmp_path / "tiny.gguf"), threads=2)
    else:
        engine = Engine(tiny_models(layers=2, hidden=128, heads=4, kv_heads=2, ffn=512), weights=weights, threads=2)
    model = engine.model
    prompts = [[5, 17, 200], [3, 3, 90, 41, 7, 255, 12], [60], [1, 2, 3, 4, 5]]
    alone = []
    for prompt in prompts:
        cache = model.new_cache(32)
        model.forward(cache, prompt)
        alone.append(model.forward(cache, [9])[0])
    caches = [model.new_cache(32) for _ in prompts]
    for cache, prompt in zip(caches, prompts):
        model.forward(cache, prompt)
    together = model.forward_batch(caches, [[9]] * len(prompts))
    assert together.shape[0] == len(prompts)
    for row, expected, cache, prompt in zip(together, alone, caches, prompts):
        assert np.array_equal(row, expected)  # bit for bit: batching must not change anyone's tokens
        assert list(cache.tokens) == prompt + [9]
    with pytest.raises(RuntimeError, match="appears twice"):
        model.forward_batch([caches[0], caches[0]], [[1], [2]])
    # Prompts too share a pass with decode steps: each sequence's last position, as alone.
    fresh = [model.new_cache(32) for _ in prompts]
    model.forward(fresh[0], prompts[0])
    mixed = model.forward_batch(fresh, [[9], *prompts[1:]])
    assert np.array_equal(mixed[0], alone[0])
    for row, cache, prompt in zip(mixed[1:], fresh[1:], prompts[1:]):
        assert np.array_equal(row, model.forward(model.new_cache(32), prompt)[0])
