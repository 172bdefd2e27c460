"""The torch reference against the official implementation's outputs (fp32, CPU)."""

import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="the torch reference: pip install '.[export]' (absent on a robot install)")
from conftest import GoldenCase, case_id, golden_cases, run_generate_json

from molmoact_edge.export.checkpoint import load_model

CASES = golden_cases()
TOL = 1e-4


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(fixture):
        if fixture not in cache:
            cache[fixture] = load_model(fixture / "checkpoint", torch.float32)
        return cache[fixture]

    return get


@pytest.fixture(scope="module", params=CASES, ids=[case_id(c) for c in CASES])
def prefill(request, models):
    """Prefill on the official processor's stored inputs, so the model is tested on its own."""
    fixture, name = request.param
    case = GoldenCase(fixture, name)
    model = models(fixture)
    ids = torch.from_numpy(case["input_ids"])
    with torch.inference_mode():
        vit = model.model.vision_backbone.vit_features(torch.from_numpy(case["images"][0]))
        feats = model.image_features(torch.from_numpy(case["images"][0]),
                                     torch.from_numpy(case["pooled_patches_idx"][0]))
        model.setup_cache(ids.shape[1] + 1)
        rows = torch.tensor(list(case["earlier_positions"]) + [ids.shape[1] - 1])
        logits, hidden = model(model.embed(ids, feats), 0, logits_rows=rows, return_hidden=True)
    return case, vit, feats, logits.numpy(), [h[0].numpy() for h in hidden]


def test_vit_multilayer_features(prefill):
    case, vit, *_ = prefill
    ref = case["vit_features_first48"]
    assert np.abs(vit[:, :ref.shape[1]].numpy() - ref).max() < TOL


def test_image_features(prefill):
    case, _, feats, *_ = prefill
    assert feats.shape == case["image_features"].shape
    assert np.abs(feats.numpy() - case["image_features"]).max() < TOL


def test_hidden_states_every_layer(prefill):
    case, *_, hidden = prefill
    ref = case["hidden_states_all"]
    assert len(hidden) == ref.shape[0]
    for i, h in enumerate(hidden):
        assert np.abs(h - ref[i]).max() < TOL, f"hidden state {i}"


def test_logits_last(prefill):
    case, _, _, logits, _ = prefill
    assert np.abs(logits[-1] - case["logits_last"]).max() < TOL


def test_logits_earlier_positions(prefill):
    case, _, _, logits, _ = prefill
    earlier = logits[:-1]
    probe = case["probe_ids"]
    assert np.abs(earlier[:, probe] - case["logits_earlier_probe"]).max() < TOL
    np.testing.assert_array_equal(earlier.argmax(-1), case["logits_earlier_argmax"])
    lse = np.log(np.exp(earlier.astype(np.float64) - earlier.max(-1, keepdims=True)).sum(-1)) + earlier.max(-1)
    assert np.abs(lse - case["logits_earlier_logsumexp"]).max() < TOL


@pytest.mark.parametrize("item", CASES, ids=[case_id(c) for c in CASES])
def test_generate_cli_greedy_ids(item):
    """The user-facing command, from image files to ids, equals the official greedy generation."""
    fixture, name = item
    case = GoldenCase(fixture, name)
    n = len(case["generated_ids"])
    out = run_generate_json(case, ["--checkpoint", str(fixture / "checkpoint")], ["--max-new-tokens", str(n), "--no-grammar"])
    assert out["token_ids"] == case["generated_ids"].tolist()
    assert out["prompt_tokens"] == case["input_ids"].shape[1]
    assert out["text"] == str(case["generated_text"])
    # The official cache after generate(n) holds prompt + n - 1 positions: one forward per new token
    # except the last.
    assert out["prompt_tokens"] + out["llm_forwards"] == case["kv_shapes_after_generate"][0, 0, 2]
