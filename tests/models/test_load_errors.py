"""Bad model input fails early with a message that names the config field and the fix."""

from __future__ import annotations

import json

import pytest
import torch

from longreach.launch.config import ModelConfig, RopeScalingConfig
from longreach.models import attention_plan, load_model
from longreach.models.load import resolve_dtype
from longreach.models.swap import attention_options_plan

from model_io_helpers import tiny_hf_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_hf_model("llama").save_pretrained(d)
    return d


def test_missing_path_names_field_and_accepted_forms(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.path='.*nope' does not exist.*\.gguf file.*embedded:smollm2-135m"):
        load_model(ModelConfig(path=str(tmp_path / "nope")))


def test_directory_without_config_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_model(ModelConfig(path=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors"):
        load_model(ModelConfig(path=str(tmp_path)))


def test_non_gguf_file(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(ModelConfig(path=str(tmp_path / "w.bin")))


def test_unsupported_architecture(tiny_dir, tmp_path):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="model_type='gpt_neox' is not supported; supported: llama, qwen2, mistral"):
        load_model(ModelConfig(path=str(tmp_path)))


def test_attention_names_and_layers(tiny_dir):
    with pytest.raises(ValueError, match=r"model.attention_layers\[1\]='nope'.*valid names: .*dense"):
        load_model(ModelConfig(path=str(tiny_dir), attention_layers={"1": "nope"}))
    with pytest.raises(ValueError, match=r"model.attention='flashy'.*valid names"):
        attention_plan(ModelConfig(attention="flashy"), 4)
    with pytest.raises(ValueError, match=r"model.attention_layers index 2 is out of range.*2 layers"):
        load_model(ModelConfig(path=str(tiny_dir), attention_layers={"2": "dense"}))
    with pytest.raises(ValueError, match=r"index 1 is out of range .*1 layers"):  # checked after truncation
        load_model(ModelConfig(path=str(tiny_dir), num_layers=1, attention_layers={"1": "dense"}))
    with pytest.raises(ValueError, match=r"model.num_layers=5 exceeds"):
        load_model(ModelConfig(path=str(tiny_dir), num_layers=5))
    assert attention_plan(ModelConfig(attention_layers={"-1": "dense"}), 3) == ["dense"] * 3
    with pytest.raises(ValueError, match="model.attention_options"):
        attention_options_plan(ModelConfig(attention_options={"window": 4}), ["dense", "dense"])


def test_dtype_device_checks():
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        resolve_dtype(torch.float16, "cpu")
    with pytest.raises(ValueError, match="model.dtype='float64'"):
        resolve_dtype("float64", "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_dtype("auto", "cuda")


def test_dynamic_rope_refused(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="dynamic"):
        load_model(ModelConfig(path=str(tiny_dir), rope_scaling=RopeScalingConfig(type="dynamic", factor=2.0)))
    # a checkpoint that already uses dynamic NTK is refused too, naming model.path
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"model.path=.*rope_type='dynamic'"):
        load_model(ModelConfig(path=str(tmp_path)))


def test_sliding_window(tmp_path, caplog):
    tiny_hf_model("mistral", sliding_window=16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"sliding_window=16 but sequences are 64 tokens.*data.seq_len <= 16"):
        load_model(ModelConfig(path=str(tmp_path)), max_seq_len=64)
    with caplog.at_level("WARNING"):
        m, _ = load_model(ModelConfig(path=str(tmp_path)), max_seq_len=16)
    assert "sliding_window=16" in caplog.text and m.args.sliding_window == 16


def test_checkpoint_architecture_mismatch(tiny_dir, tmp_path):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["model_type"] = "qwen2"  # qwen2 expects q/k/v biases the llama checkpoint lacks
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"does not match the qwen2 architecture: missing \['model.layers.0.self_attn.k_proj.bias'"):
        load_model(ModelConfig(path=str(tmp_path)))
