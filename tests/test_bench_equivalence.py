"""The benchmark compares against transformers' Qwen2 with our LLM weights; that comparison is only
fair if it is the same model. Checked on the golden fixture: transformers, fed our prompt
embeddings, must reproduce the official implementation's greedy ids."""

import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="the torch reference: pip install '.[export]' (absent on a robot install)")
from conftest import GoldenCase

from molmoact_edge.export.checkpoint import load_model

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install '.[bench]')")


def test_transformers_qwen2_with_our_weights_reproduces_official_ids(checkpoint_a, fixture_a):
    from molmoact_edge.benchmarks.decode_loop import hf_generate, qwen2_from_reference

    case = GoldenCase(fixture_a, "single_256")
    model = load_model(checkpoint_a, torch.float32)
    with torch.inference_mode():
        feats = model.image_features(torch.from_numpy(case["images"][0]),
                                     torch.from_numpy(case["pooled_patches_idx"][0]))
        embeds = model.embed(torch.from_numpy(case["input_ids"]), feats)
    hf = qwen2_from_reference(model)
    with torch.inference_mode():
        logits = hf(inputs_embeds=embeds).logits[0, -1].numpy()
    assert np.abs(logits - case["logits_last"]).max() < 1e-4
    ids, _ = hf_generate(hf, embeds, len(case["generated_ids"]))
    assert ids == case["generated_ids"].tolist()
