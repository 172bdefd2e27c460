"""Expert data in MolmoAct's format: every answer is read back by the runtime's own parser and
accepted by its output grammar, with the values the expert meant (within one bin)."""

from __future__ import annotations

import numpy as np
import pytest

from molmoact_edge.hardware.render_camera import SceneRenderer  # noqa: F401  (first: MuJoCo's headless GL)
from molmoact_edge.export.demo_data import (
    CHUNK,
    NEAR_GOAL_M,
    NORM_STATS,
    START_EE,
    STEP_M,
    DataConfig,
    generate,
    read_samples,
)
from molmoact_edge.hardware.scene import Scene, camera_intrinsics, project
from molmoact_edge.runtime.control.convention import convention_for
from molmoact_edge.runtime.control.expert import DEMO_UNNORM_KEY, expert_actions
from molmoact_edge.runtime.engine.actions import ActionDecoder
from molmoact_edge.runtime.engine.config import ActionStats
from molmoact_edge.runtime.engine.grammar import OutputGrammar
from molmoact_edge.runtime.engine.parser import parse_step, trace_to_pixels
from molmoact_edge.runtime.engine.tokenizer import Tokenizer



@pytest.fixture(scope="module")
def tok(fixture_a):
    return Tokenizer.from_checkpoint(fixture_a / "checkpoint")  # the real tokenizer


@pytest.fixture(scope="module")
def data(tok, tmp_path_factory):
    out = generate(tmp_path_factory.mktemp("demo-data"), DataConfig(seeds=(3, 4), path_samples=2, random_samples=1,
                                                                          hover_samples=1, descent_samples=1,
                                                                          near_goal_samples=1, single_object_seeds=(5,)), tok)
    return out, read_samples(out)


def _decoder(tok):
    return ActionDecoder(base_vocab=tok.rust.get_vocab(with_added_tokens=False),
                         base_vocab_size=tok.special.base_vocab_size,
                         stats=ActionStats.from_json(DEMO_UNNORM_KEY, NORM_STATS[DEMO_UNNORM_KEY]),
                         unnorm_key=DEMO_UNNORM_KEY)


def test_answers_parse_to_what_the_expert_meant(tok, data):
    out, samples = data
    assert len(samples) == 2 * 6 * 3 + 6 and all((out / s["image"]).is_file() for s in samples)
    dec = _decoder(tok)
    intr = camera_intrinsics()
    for s in samples:
        p = parse_step(s["answer"], dec, depth_codes=100, codebook_size=128)
        assert p.ok, p.parse_errors
        assert len(p.depth) == 100 and len(p.trace) == 5 and p.actions.shape == (CHUNK, 7)
        want = expert_actions(np.array(s["ee"]), np.array(s["goal"]), STEP_M, CHUNK)
        bin_width = 2 * STEP_M / 255
        assert np.abs(p.actions[:, :3] - want[:, :3]).max() <= bin_width
        assert np.all(p.actions[:, 3:6] == 0.0)
        assert convention_for(DEMO_UNNORM_KEY).closedness(p.actions[0, 6]) < 0.01  # open
        last = trace_to_pixels(p.trace, intr.width, intr.height)[-1]
        assert np.linalg.norm(last - np.array(s["object_px"])) < 0.1 * intr.width


def test_every_image_is_posed_once_per_object_with_its_own_answer(data):
    _, samples = data
    by_image: dict[str, list[dict]] = {}
    for s in samples:
        by_image.setdefault(s["image"], []).append(s)
    for image, group in by_image.items():
        scene = Scene.from_seed(group[0]["seed"], group[0]["n_objects"])
        assert sorted(s["instruction"] for s in group) == sorted(f"move to the {o.name}" for o in scene.objects)
        assert len({s["answer"].split(" The trajectory")[1] for s in group}) == len(group)  # trace/actions differ
        assert len(group) == (1 if group[0]["seed"] == 5 else 3)
        assert len({s["answer"].split(" The trajectory")[0] for s in group}) == 1  # one image, one depth map
        for s in group:
            o = scene.objects[s["target"]]
            assert np.allclose(s["goal"], o.goal) and np.allclose(s["object_px"], project(o.centre)[0])


def test_hover_frames_lie_at_the_goal_height_where_the_expert_moves_across(data):
    _, samples = data
    hover = [s for s in samples if s["image"].endswith("-03.png")]  # after 2 path frames and 1 random
    assert len(hover) == 2 * 3 + 1
    for s in hover:
        ee, goal = np.array(s["ee"]), np.array(s["goal"])
        assert abs(ee[2] - goal[2]) <= STEP_M
        first = expert_actions(ee, goal, STEP_M, 1)[0, :3]
        assert np.any(first[:2] != 0)  # the expert moves across from there


def test_descent_frames_lie_above_the_start_pose_where_the_expert_turns(data):
    _, samples = data
    descent = [s for s in samples if s["image"].endswith("-04.png")]  # the last (and only) descent frame
    assert len(descent) == 2 * 3 + 1
    for s in descent:
        ee, goal = np.array(s["ee"]), np.array(s["goal"])
        assert np.all(np.abs(ee[:2] - np.array(START_EE[:2])) <= 0.01)
        assert goal[2] + 0.2 * STEP_M <= ee[2] <= goal[2] + 2.5 * STEP_M


def test_near_goal_frames_lie_beside_the_scene_target_at_its_height(data):
    _, samples = data
    near = [s for s in samples if s["image"].endswith("-05.png")]  # the one near-goal frame, after descent
    assert len(near) == 2 * 3 + 1
    checked = 0
    for s in near:
        scene = Scene.from_seed(s["seed"], s["n_objects"])
        if s["target"] != scene.target:
            continue  # the same image under another object's instruction: that goal is anywhere
        ee, goal = np.array(s["ee"]), np.array(s["goal"])
        assert np.all(np.abs(ee[:2] - goal[:2]) <= NEAR_GOAL_M) and abs(ee[2] - goal[2]) <= STEP_M
        checked += 1
    assert checked == 3


def test_answers_are_accepted_by_the_output_grammar(tok, data):
    _, samples = data
    g = OutputGrammar.from_tokenizer(tok, 7, max_actions=CHUNK, decoder=_decoder(tok))
    for s in samples:
        ids = tok.encode(s["answer"]) + [tok.special.eos]
        assert g.start().accepts(ids, complete=True), s["answer"][:200]


def test_evaluation_seeds_are_never_training_data():
    with pytest.raises(ValueError, match="never"):
        DataConfig(seeds=(999, 1000))
    with pytest.raises(ValueError, match="never"):
        DataConfig(seeds=(1,), single_object_seeds=(1000,))
    with pytest.raises(ValueError, match="both"):
        DataConfig(seeds=(1, 2), single_object_seeds=(2,))
