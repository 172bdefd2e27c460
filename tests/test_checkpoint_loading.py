"""Checkpoint loading: formats that must load identically, and damage that must be refused clearly."""

import json
import shutil

import pytest
torch = pytest.importorskip("torch", reason="the torch reference: pip install '.[export]' (absent on a robot install)")
from safetensors.torch import load_file, save_file

from molmoact_edge.export.checkpoint import CheckpointError, load_model
from molmoact_edge.export.tiny import write_checkpoint
from molmoact_edge.runtime.engine.config import ConfigError


def _logits(model):
    model.setup_cache(8)
    ids = torch.tensor([[151643, 785, 3383, 374, 3265]])
    with torch.inference_mode():
        return model(model.embed(ids), 0)


def test_sharded_index_loads_the_same_weights(checkpoint_copy):
    reference = _logits(load_model(checkpoint_copy))
    tensors = load_file(str(checkpoint_copy / "model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for fname, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(checkpoint_copy / fname))
    (checkpoint_copy / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (checkpoint_copy / "model.safetensors").unlink()
    assert torch.equal(_logits(load_model(checkpoint_copy)), reference)


def test_fp32_checkpoint_loads_like_bf16_upcast(checkpoint_copy):
    reference = _logits(load_model(checkpoint_copy))
    tensors = {k: v.float() for k, v in load_file(str(checkpoint_copy / "model.safetensors")).items()}
    save_file(tensors, str(checkpoint_copy / "model.safetensors"))
    assert torch.equal(_logits(load_model(checkpoint_copy)), reference)


def test_bf16_load_keeps_dtype(checkpoint_copy):
    model = load_model(checkpoint_copy, torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert _logits(model).dtype == torch.bfloat16


def test_missing_key_is_listed(checkpoint_copy):
    tensors = load_file(str(checkpoint_copy / "model.safetensors"))
    del tensors["model.transformer.ln_f.weight"]
    save_file(tensors, str(checkpoint_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['model.transformer.ln_f.weight'\]"):
        load_model(checkpoint_copy)


def test_unexpected_key_is_listed(checkpoint_copy):
    tensors = load_file(str(checkpoint_copy / "model.safetensors"))
    tensors["model.transformer.blocks.7.attn_norm.weight"] = torch.ones(32)
    save_file(tensors, str(checkpoint_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): \['model.transformer.blocks.7"):
        load_model(checkpoint_copy)


def test_shape_mismatch_is_listed_against_config(checkpoint_copy):
    cfg = json.loads((checkpoint_copy / "config.json").read_text())
    cfg["llm_config"]["intermediate_size"] = 64  # weights were made with 48
    (checkpoint_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_model(checkpoint_copy)
    msg = str(e.value)
    assert "shape mismatches" in msg and "mlp.ff_proj.weight: checkpoint [96, 32] vs model [128, 32]" in msg


def test_truncated_file_is_refused(checkpoint_copy):
    path = checkpoint_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt: re-download"):
        load_model(checkpoint_copy)


def test_garbage_header_is_refused(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(checkpoint_copy)


def test_nan_weights_are_refused(checkpoint_copy):
    tensors = load_file(str(checkpoint_copy / "model.safetensors"))
    tensors["lm_head.weight"][0, 0] = float("nan")
    save_file(tensors, str(checkpoint_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight .* NaN"):
        load_model(checkpoint_copy)


def test_missing_weights_file(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="expected model.safetensors or model.safetensors.index.json"):
        load_model(checkpoint_copy)


def test_missing_shard_named_in_index(checkpoint_copy):
    (checkpoint_copy / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(checkpoint_copy)


def test_missing_config(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json is missing"):
        load_model(checkpoint_copy)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
