"""The MolmoAct policy drafts each step from its previous answer (on by default, run --no-draft
turns it off) without changing its answers, and the decode counts reach the worker's chunks (and
from there the run log's chunk records)."""

from __future__ import annotations

import numpy as np
import pytest
from control_helpers import INTR, wait_for
from molmoact_edge.hardware.camera import Frame
from molmoact_edge.hardware.geometry import Pose
from molmoact_edge.runtime.control.policy import Observation, PolicySpec
from molmoact_edge.runtime.control.worker import InferenceWorker, WorkerConfig
from molmoact_edge.runtime.molmoact_policy import MolmoActConfig, MolmoActPolicy
from PIL import Image

HOME = Pose((0.4, 0.0, 0.4), (1.0, 0.0, 0.0, 0.0))


@pytest.fixture(scope="module")
def observations(fixture_a):
    """Two consecutive frames: the same scene, the second shifted by two pixels."""
    img = np.asarray(Image.open(fixture_a / "cases" / "img_256_a.png").convert("RGB"))
    out = []
    for i, im in enumerate((img, np.roll(img, 2, axis=1))):
        frame = Frame(color=np.ascontiguousarray(im), depth=None, timestamp=1.0 + i, index=i, intrinsics=INTR)
        out.append(Observation(frames=(frame,), instruction="close the box", timestamp=1.0 + i, pose=HOME, index=i))
    return out


def test_policy_drafts_from_its_previous_answer_and_answers_the_same(bundle_a, observations):
    drafting = MolmoActPolicy(MolmoActConfig(bundle=str(bundle_a), max_new_tokens=600, max_actions=2))
    plain = MolmoActPolicy(MolmoActConfig(bundle=str(bundle_a), max_new_tokens=600, max_actions=2, draft=False))
    try:
        drafting.predict(observations[0])
        assert drafting.step_info["draft_tokens"] == 0  # nothing to draft from yet
        got = drafting.predict(observations[1])
        want = plain.predict(observations[1])
        info = drafting.step_info
    finally:
        drafting.close()
        plain.close()
    assert drafting.last_step.token_ids == plain.last_step.token_ids
    np.testing.assert_array_equal(got, want)
    assert info["draft_tokens"] > 0 and 0 <= info["accepted_tokens"] <= info["draft_tokens"]
    assert info["llm_forwards"] <= plain.step_info["llm_forwards"]
    assert info["new_tokens"] == len(plain.last_step.token_ids) and plain.step_info["draft_tokens"] == 0


def test_worker_chunks_carry_the_decode_counts(bundle_a, observations):
    spec = PolicySpec(kind="molmoact", options={"bundle": str(bundle_a), "max_new_tokens": 600, "max_actions": 2})
    with InferenceWorker(spec, WorkerConfig(mode="thread")) as w:
        chunks = []
        for ob in observations:
            wait_for(lambda ob=ob: not w.busy and w.submit(ob), 120.0, "the worker to take the observation")
            got: list = []
            wait_for(lambda got=got: got.append(w.poll()) or got[-1] is not None, 300.0, "the chunk")
            chunks.append(got[-1])
    first, second = (c.info for c in chunks)
    for info in (first, second):
        assert {"inference_s", "llm_forwards", "new_tokens", "draft_tokens", "accepted_tokens",
                "draft_segments"} <= set(info)
        assert sum(s["draft_tokens"] for s in info["draft_segments"].values()) == info["draft_tokens"]
    assert first["draft_tokens"] == 0 and second["draft_tokens"] > 0
