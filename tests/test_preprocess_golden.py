"""Preprocessing and prompt building against the official processor's outputs."""

import numpy as np
import pytest
from conftest import GoldenCase, case_id, golden_cases

from molmoact_edge.runtime.engine.pipeline import ModelSpec

CASES = golden_cases()


@pytest.fixture(scope="module", params=CASES, ids=[case_id(c) for c in CASES])
def built(request):
    fixture, name = request.param
    case = GoldenCase(fixture, name)
    spec = ModelSpec.load(fixture / "checkpoint")
    return case, spec.inputs(case.images(), case.instruction, case.template), spec


def test_input_ids_identical(built):
    case, inputs, _ = built
    np.testing.assert_array_equal(inputs.input_ids, case["input_ids"][0])


def test_pooled_patches_idx_identical(built):
    case, inputs, _ = built
    np.testing.assert_array_equal(inputs.vision.pooled_patches_idx, case["pooled_patches_idx"][0])


def test_crops_within_one_uint8_step(built):
    case, inputs, _ = built
    ref = case["images"][0]
    assert inputs.vision.crops.shape == ref.shape
    diff = np.abs(inputs.vision.crops - ref)
    # One uint8 step after SigLIP normalisation is 2/255; allow float rounding on top.
    assert diff.max() <= 2 / 255 + 1e-6
    # A different interpolation kernel may flip isolated values, never a noticeable share.
    assert (diff > 1e-6).mean() < 1e-5


def test_image_grids_identical(built):
    case, inputs, _ = built
    grids = [g for item in inputs.vision.per_image for g in item.grids]
    np.testing.assert_array_equal(np.array(grids), case["image_grids"][0])


def test_prompt_text_and_decoding(built):
    case, inputs, spec = built
    assert inputs.text == str(case["text"])
    assert spec.tokenizer.decode(inputs.input_ids, skip_special_tokens=False) == str(case["decoded_input"])
