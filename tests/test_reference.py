"""The demo model against Hugging Face transformers (+ CPU torch): tokens, template, logits, greedy text."""
import numpy as np
import pytest

from llaisys_chat.engine import Engine
from llaisys_chat.generate import generate
from llaisys_chat.model.builtins import builtin_gguf, find_builtin
from llaisys_chat.model.chat_format import ChatFormat

torch = pytest.importorskip("torch", reason="the test extra (torch, transformers) is not installed")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.reference

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.  Multiple   spaces\tand\ttabs\n\nnew lines",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "量子计算机如何工作？请用简单的语言解释。",
    "Emoji 🎉🚀👍🏽 and mixed 日本語 text with numbers 1234567890 and <|im_start|> markers",
    "naïve café — “quotes” ‘single’ … ½ ∑ ∫ ≠",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Write a Python function to check if a number is prime."}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "What is MPI?"}],
    [{"role": "user", "content": "用一句话解释什么是张量并行。"}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."},
     {"role": "user", "content": "And multiplied by 10?"}],
    [{"role": "user", "content": "Explain recursion to a child in two sentences."}],
]


@pytest.fixture(scope="module")
def hf():
    """transformers' tokenizer and f32 model, both read from the demo GGUF itself."""
    gguf = builtin_gguf(find_builtin("demo"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def engine_f32():
    return Engine("demo", weights="f32", threads=2)


def test_tokenization_matches(hf, demo_folder):
    tokenizer, _ = hf
    ours = ChatFormat(demo_folder)
    for text in TEXTS:
        assert ours.encode(text) == tokenizer.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("Hello world") == [9707, 1879]


def test_chat_template_matches(hf, demo_folder):
    tokenizer, _ = hf
    ours = ChatFormat(demo_folder)
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.render(messages) == expected
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert ours.encode_chat(messages) == list(ids)


def test_first_step_logits_match_in_f32(hf, engine_f32):
    _, model = hf
    assert engine_f32.weights == "f32"
    for messages in CONVERSATIONS:
        ids = engine_f32.chat.encode_chat(messages)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, -1].numpy()
        cache = engine_f32.model.new_cache(len(ids) + 1)
        got = engine_f32.model.forward(cache, ids)[0]
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-3


def test_greedy_tokens_match_in_f32(hf, engine_f32):
    tokenizer, model = hf
    for messages in CONVERSATIONS:
        reply = generate(messages=messages, engine=engine_f32, max_new_tokens=32)
        with torch.no_grad():
            out = model.generate(torch.tensor([reply.prompt_ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=sorted(engine_f32.chat.stop_ids), pad_token_id=tokenizer.pad_token_id)
        expected = [t for t in out[0, len(reply.prompt_ids):].tolist() if t not in engine_f32.chat.stop_ids]
        assert reply.new_ids == expected, messages[-1]["content"]


def test_the_1_5b_built_in_gives_transformers_greedy_tokens_in_f32():
    """Qwen2.5-Coder-1.5B (untied output, 12 heads of 128, 2 KV heads): 32 greedy tokens on three prompts."""
    gguf = builtin_gguf(find_builtin("qwen2.5-coder:1.5b"))
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    engine = Engine("qwen2.5-coder:1.5b", weights="f32", threads=2)
    assert engine.config.hidden_size == 1536 and not engine.config.tie_word_embeddings
    for messages in CONVERSATIONS[:3]:
        reply = generate(messages=messages, engine=engine, max_new_tokens=32)
        with torch.no_grad():
            out = model.generate(torch.tensor([reply.prompt_ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=sorted(engine.chat.stop_ids), pad_token_id=151643)
        expected = [t for t in out[0, len(reply.prompt_ids):].tolist() if t not in engine.chat.stop_ids]
        assert reply.new_ids == expected, messages[-1]["content"]


def test_multi_turn_cache_reuse_equals_a_fresh_computation(demo_folder):
    engine = Engine(demo_folder, threads=2)
    messages = [{"role": "user", "content": "Give me a Python one-liner that reverses a list."}]
    first = generate(messages=messages, engine=engine, max_new_tokens=32)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Now for a string."}]
    prompt = engine.chat.encode_chat(messages)
    reused = engine.generate(prompt, max_new_tokens=32).run()
    assert reused.stats.cached_tokens > len(first.prompt_ids)
    fresh = engine.generate(prompt, max_new_tokens=32, cache_key="fresh").run()
    assert fresh.stats.cached_tokens == 0 and reused.tokens == fresh.tokens
