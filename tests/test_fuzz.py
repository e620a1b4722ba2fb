"""Everything that reads untrusted bytes, fuzzed with hypothesis in bounded runs: safetensors headers
and offsets, GGUF counts, strings, offsets and sizes, quantized blocks, config.json, tokenizer config
and chat templates, message lists and saved conversations. Each either works or raises one
LlaisysError; nothing else escapes, nothing hangs. Inputs that once broke something stay as examples."""
import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tiny import write_tiny_gguf, write_tiny_model

from llaisys_chat import _native
from llaisys_chat.client.session import Session
from llaisys_chat.engine import Engine
from llaisys_chat.errors import LlaisysError
from llaisys_chat.model.chat_format import ChatFormat
from llaisys_chat.model.checkpoint import Checkpoint
from llaisys_chat.model.config import ModelConfig
from llaisys_chat.model.gguf_file import GGUFFile
from llaisys_chat.protocol.messages import validate_messages

BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
                    max_leaves=20)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("fuzz") / "m", layers=1)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Folders made for fuzzed GGUF files go to a cache of this module's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAISYS_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("fuzz") / "tiny.gguf", layers=1, hidden=64, heads=2, kv_heads=1,
                           ffn=256, types=dict.fromkeys(["token_embd", "output", "attn_q", "attn_k", "attn_v",
                                                         "attn_output", "ffn_gate", "ffn_up", "ffn_down"], "Q8_0"))


def outcome(fn, *args):
    """fn(*args)'s result, or the LlaisysError it raised; anything else fails the test."""
    try:
        return fn(*args)
    except LlaisysError as e:
        assert str(e) and "\n" not in str(e), repr(e)
        return e


@BOUNDED
@given(header=st.binary(max_size=300), body=st.binary(max_size=64))
@example(header=b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', body=b"\x00" * 8)
@example(header=b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}', body=b"")
def test_safetensors_headers_and_offsets(header, body):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + body)
        outcome(Checkpoint, tmp)


@BOUNDED
@given(data=st.data())
def test_gguf_counts_strings_offsets_and_sizes(tiny_gguf, data):
    original = bytearray(tiny_gguf.read_bytes())
    header_end = 8192  # metadata and tensor infos of the tiny file
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, header_end - 1))
        mutated[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([len(mutated), data.draw(st.integers(0, len(mutated)))]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.gguf"
        path.write_bytes(bytes(mutated[:cut]))
        parsed = outcome(GGUFFile, path)
        if isinstance(parsed, GGUFFile):
            outcome(lambda: Engine(path, threads=1, max_context=32))


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=34 * 8, max_size=34 * 8), kind=st.sampled_from(["Q8_0", "Q4_0", "Q5_0"]))
def test_any_bits_are_valid_blocks(data, kind):
    dtype = getattr(_native.DType, kind)
    block = {"Q8_0": 34, "Q4_0": 18, "Q5_0": 22}[kind]
    blocks = np.frombuffer(data[:block * 8], np.uint8).reshape(2, block * 4)
    values = _native.dequantize(_native.QuantizedArray(blocks.copy(), dtype))
    out = np.zeros((1, 2), np.float32)
    _native.linear(out, np.ones((1, 128), np.float32), _native.pack_weight(_native.QuantizedArray(blocks.copy(), dtype), dtype))
    assert values.shape == (2, 128)


@BOUNDED
@given(raw=JSON)
@example(raw={"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 0})
@example(raw={"model_type": "qwen2", "rope_parameters": []})
def test_config_json(raw):
    result = outcome(ModelConfig.from_dict, raw) if isinstance(raw, dict) else None
    assert result is None or isinstance(result, (ModelConfig, LlaisysError))


@BOUNDED
@given(template=st.text(max_size=120), extra=st.dictionaries(st.sampled_from(["eos_token", "bos_token", "pad_token"]),
                                                                JSON, max_size=3))
@example(template="{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", extra={})
@example(template="{{ 'ab' * 999999999 }}", extra={})
@example(template="{{ messages.__class__.__mro__ }}", extra={})
@example(template="{{ messages[5]['content'] }}", extra={})
@example(template="0", extra={"eos_token": [None]})
def test_tokenizer_config_and_chat_template(tiny_folder, template, extra):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(tiny_folder, Path(tmp) / "m"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, **extra}))
        chat = outcome(ChatFormat, folder)
        if isinstance(chat, ChatFormat):
            outcome(chat.render, [{"role": "user", "content": "hi"}])


@BOUNDED
@given(raw=JSON)
@example(raw=[{"role": "user", "content": 3}])
def test_message_lists(raw):
    outcome(validate_messages, raw)


@BOUNDED
@given(raw=JSON)
@example(raw={"version": 1, "messages": [], "sampling": {"temperature": "hot"}})
@example(raw={"version": 1, "messages": [], "sampling": [1]})
def test_saved_conversations(raw):
    session = Session(client=None)
    outcome(session.restore, raw)


def test_a_layer_count_in_the_billions_is_an_error_not_an_allocation(tiny_gguf, tiny_folder, tmp_path):
    """Found by the GGUF fuzz run (one byte of block_count changed: the weight table of 400 million
    layers took 23 GB before anything was checked)."""
    data = bytearray(tiny_gguf.read_bytes())
    key = b"qwen2.block_count"
    at = data.index(key) + len(key) + 4  # after the key: the value's type (u32), then the value
    data[at:at + 4] = struct.pack("<I", 400_000_000)
    hostile = tmp_path / "hostile.gguf"
    hostile.write_bytes(bytes(data))
    with pytest.raises(LlaisysError, match="400000000 layers"):
        Engine(hostile, threads=1, max_context=32)
    folder = tmp_path / "folder"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**12}))
    with pytest.raises(LlaisysError, match="no tensor"):
        Engine(folder, threads=1, max_context=32)
