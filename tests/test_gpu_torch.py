"""The torch-CUDA path: the static-cache decode step (fixed shapes, position as a device tensor, the
step a CUDA graph captures) gives the reference's ids and logits; benchmarks/gpu_step.py runs tiny
on the CPU; on a CUDA GPU, greedy-id parity with the CPU reference and a stated bf16 tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GoldenCase, case_id, golden_cases, needs_torch

pytestmark = needs_torch
CASES = golden_cases()
# bf16 on the GPU vs fp32 on the CPU, first prompt + 8 decode positions of fixture A: bf16 keeps 8 bits
# of mantissa (relative step 2^-8 = 0.4 %), accumulated over the layers; this bound is stated, not yet
# measured (no GPU in this session): max |logit difference| <= 3 % of the largest |logit| + 0.05.
BF16_REL, BF16_ABS = 0.03, 0.05


def _cuda_ok() -> bool:
    try:  # evaluated at collection, also on the robot install (no torch), where the module skips anyway
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def reference_a(checkpoint_a):
    import torch

    from molmoact_edge.export.checkpoint import load_model

    return load_model(checkpoint_a, torch.float32)


def _pipeline(checkpoint, model, **kw):
    from molmoact_edge.export.torch_backend import TorchBackend
    from molmoact_edge.runtime.engine.pipeline import ModelSpec, Pipeline

    return Pipeline(ModelSpec.load(checkpoint), TorchBackend(model, model.lm_head.weight.device, **kw))


@pytest.mark.parametrize("item", CASES, ids=[case_id(c) for c in CASES])
def test_static_decode_reproduces_official_ids(item):
    import torch

    from molmoact_edge.export.checkpoint import load_model

    fixture, name = item
    case = GoldenCase(fixture, name)
    want = case["generated_ids"].tolist()
    model = load_model(fixture / "checkpoint", torch.float32)
    p = _pipeline(fixture / "checkpoint", model, static_decode=True)
    out = p.step(case.images(), case.instruction, case.template, max_new_tokens=len(want))
    assert p.backend.static is not None  # the decode steps really went through StaticDecode
    assert out.result.token_ids == want


def _logits(backend, case, steps=8):
    ids = case["input_ids"][0]
    backend.reset(len(ids) + steps + 4)
    feats = backend.vision(case["images"][0], case["pooled_patches_idx"][0])
    out = [backend.forward(ids, 0, feats)]
    for i, tok in enumerate(case["generated_ids"][:steps]):
        out.append(backend.forward(np.array([tok]), len(ids) + i))
    return np.concatenate(out)


def test_static_decode_logits_equal_the_reference_path(reference_a, fixture_a):
    from molmoact_edge.export.torch_backend import TorchBackend

    case = GoldenCase(fixture_a, "multi_2x256")
    plain = _logits(TorchBackend(reference_a), case)
    static = _logits(TorchBackend(reference_a, static_decode=True), case)
    assert np.abs(plain - static).max() < 1e-4
    assert np.abs(plain[0] - case["logits_last"]).max() < 1e-4


def test_cuda_graph_needs_cuda(reference_a):
    from molmoact_edge.export.torch_backend import TorchBackend

    with pytest.raises(ValueError, match="CUDA"):
        TorchBackend(reference_a, "cpu", cuda_graph=True)


def test_gpu_step_benchmark_runs_tiny_on_cpu():
    """The GPU benchmark's code path at a tiny shape: every decode engine (the reference, the static
    step, transformers' Qwen2 with the same weights) produces the reference's greedy ids."""
    pytest.importorskip("transformers", reason="the benchmark compares with transformers: pip install '.[bench]'")
    from molmoact_edge.benchmarks.gpu_step import run, table

    r = run("tiny", "cpu", "fp32", prompt=40, new_tokens=6, crops=1, image_tokens=16, say=lambda s: None)
    assert set(r["decode"]) == {"reference eager", "static cache eager", "transformers Qwen2 eager generate"}
    assert all(v["ids_match_reference"] == 6 and v["ms_per_token"] > 0 for v in r["decode"].values())
    assert r["floor_ms_per_token"] > 0 and r["vision_ms"] > 0 and r["prefill_ms"] > 0
    assert "| static cache eager |" in table(r)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_cuda_graph_ids_and_bf16_logits(reference_a, checkpoint_a, fixture_a):
    import torch

    from molmoact_edge.export.checkpoint import load_model
    from molmoact_edge.export.torch_backend import TorchBackend

    case = GoldenCase(fixture_a, "single_256")
    want = case["generated_ids"].tolist()
    fp32 = load_model(checkpoint_a, torch.float32, "cuda")
    p = _pipeline(checkpoint_a, fp32)  # CUDA: static decode, captured
    out = p.step(case.images(), case.instruction, case.template, max_new_tokens=len(want))
    assert p.backend.static is not None and p.backend.static.graph is not None
    assert out.result.token_ids == want
    ref = _logits(TorchBackend(reference_a), case)
    bf16 = _logits(TorchBackend(load_model(checkpoint_a, torch.bfloat16, "cuda"), "cuda"), case)
    assert np.abs(bf16 - ref).max() <= BF16_REL * np.abs(ref).max() + BF16_ABS
