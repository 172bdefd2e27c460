"""A safetensors header that declares another dtype than the weights were saved in (BF16 relabelled
F16 or I16: same bytes, other numbers) is refused with the tensor named, instead of loading garbage."""

import json
import shutil
import struct

import pytest

pytest.importorskip("torch", reason="the torch side: pip install '.[export]' (absent on a robot install)")
import torch
from safetensors.torch import load_file, save_file

from molmoact_edge.export.checkpoint import CheckpointError, load_model
from molmoact_edge.export.tiny import write_checkpoint


def _relabel(path, new_dtype, keys=None):
    """Rewrite the dtype of ``keys`` (all tensors if None) in the file's JSON header, data untouched:
    what a damaged or tampered header looks like."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    for k, v in header.items():
        if k != "__metadata__" and (keys is None or k in keys):
            v["dtype"] = new_dtype
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _config(checkpoint_copy, **changes):
    cfg = json.loads((checkpoint_copy / "config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (checkpoint_copy / "config.json").write_text(json.dumps(cfg))


def test_the_tiny_checkpoint_is_uniform_bf16(checkpoint_copy):
    assert json.loads((checkpoint_copy / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(checkpoint_copy / "model.safetensors")).values()} == {torch.bfloat16}
    load_model(checkpoint_copy)


def test_bf16_relabelled_f16_is_refused_against_torch_dtype(checkpoint_copy):
    _relabel(checkpoint_copy / "model.safetensors", "F16")
    with pytest.raises(CheckpointError, match=r"another dtype.*torch_dtype says BF16.*'lm_head.weight: F16 in "
                                              r"model.safetensors'"):
        load_model(checkpoint_copy)


def test_one_tensor_relabelled_is_named_without_torch_dtype(checkpoint_copy):
    _config(checkpoint_copy, torch_dtype=None)
    _relabel(checkpoint_copy / "model.safetensors", "F16", keys={"model.transformer.ln_f.weight"})
    with pytest.raises(CheckpointError, match=r"\(1; every other tensor is BF16.*model.transformer.ln_f.weight: F16"):
        load_model(checkpoint_copy)


def test_bf16_relabelled_i16_is_refused(checkpoint_copy):
    _relabel(checkpoint_copy / "model.safetensors", "I16", keys={"lm_head.weight"})
    with pytest.raises(CheckpointError, match=r"non-floating-point tensors \(1.*lm_head.weight: I16"):
        load_model(checkpoint_copy)


def test_fp32_copy_of_a_bf16_checkpoint_still_loads(checkpoint_copy):
    reference = load_model(checkpoint_copy).lm_head.weight
    tensors = {k: v.float() for k, v in load_file(str(checkpoint_copy / "model.safetensors")).items()}
    save_file(tensors, str(checkpoint_copy / "model.safetensors"))
    assert torch.equal(load_model(checkpoint_copy).lm_head.weight, reference)


def test_unknown_torch_dtype_is_named(checkpoint_copy):
    _config(checkpoint_copy, torch_dtype="int4")
    with pytest.raises(CheckpointError, match="torch_dtype 'int4' is not one of"):
        load_model(checkpoint_copy)
