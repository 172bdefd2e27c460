"""DAgger's rollouts (export/demo_rollout.py): the rendered poses a policy visits, kinematically.
The policy here is a stand-in that reports what it was shown; the CLI test in test_demo_train.py
rolls a real exported bundle out."""

from __future__ import annotations

import numpy as np
import pytest

from molmoact_edge.hardware.render_camera import SceneRenderer  # first: MuJoCo's headless GL
from molmoact_edge.export.demo_data import CHUNK, START_EE, STEP_M
from molmoact_edge.export.demo_rollout import NEAR_M, ROLLOUT_BOX, kept, rollout
from molmoact_edge.hardware.scene import SUCCESS_RADIUS_M, Scene
from molmoact_edge.runtime.control.expert import expert_actions


@pytest.fixture
def scene_renderer():
    scene = Scene.from_seed(3)
    r = SceneRenderer(scene)
    yield scene, r
    r.close()


def test_a_rollout_adds_each_answers_translations_until_it_reaches_the_goal(scene_renderer):
    scene, r = scene_renderer
    goal = scene.target_object.goal
    seen, where = [], [np.array(START_EE)]

    def act(rgb, instruction):  # the expert, tracking the pose it was asked from
        seen.append((rgb.copy(), instruction))
        a = expert_actions(where[-1], goal, STEP_M, CHUNK)
        where.append(where[-1] + a[:, :3].sum(0))
        return a

    run = rollout(scene, r, act, max_steps=60)
    assert run.reached and np.linalg.norm(run.poses[-1] - goal) <= SUCCESS_RADIUS_M
    assert np.allclose(run.poses, where[:len(run.poses)])
    assert len(seen) == len(run.poses) - 1 and all(i == scene.instruction for _, i in seen)
    for (rgb, _), (frame, depth) in zip(seen, run.frames):
        assert np.array_equal(rgb, frame) and depth.shape == rgb.shape[:2]
    assert not np.array_equal(run.frames[0][0], run.frames[-1][0])  # the arm moved in the image


def test_a_rollout_stops_after_its_answers_and_stays_in_the_box(scene_renderer):
    scene, r = scene_renderer
    up = np.zeros((CHUNK, 7))
    up[:, 2] = 1.0  # a metre up per action
    run = rollout(scene, r, lambda rgb, instruction: up, max_steps=3)
    assert not run.reached and len(run.poses) == 4
    assert np.allclose([p[2] for p in run.poses[1:]], ROLLOUT_BOX[1][2])
    nothing = rollout(scene, r, lambda rgb, instruction: np.zeros((0, 7)), max_steps=3)
    assert len(nothing.poses) == 1  # no action parsed: the rollout ends


def test_kept_poses_are_all_near_the_goal_and_every_other_one_farther():
    goal = np.array([0.5, 0.0, 0.2])
    far = [goal + np.array([0.0, 0.0, 0.3])] * 5
    near = [goal + np.array([0.0, NEAR_M * 0.9, 0.0])] * 3
    assert kept(far + near, goal) == [2, 4, 5, 6, 7]  # never the start pose (index 0)
