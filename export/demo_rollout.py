"""DAgger for the demo policy: the expert's labels on the states the policy itself visits.

Trained only on the expert's states, a policy's small errors take it where the expert never goes
(session 8: run rc, once down at the goal's height, kept going down to the workspace floor, and
stepped a full centimetre back and forth across the goal), and there it has no example to follow.
So a bundle is rolled out on training scenes and the poses it visits are written as training frames
with the expert's answer (`frame_records`), as in DAgger (Ross et al., 2011).

The rollout is kinematic: the scene is rendered with the end effector at a pose (inverse kinematics,
no physics, like every other training frame), the bundle answers on that image and the scene's
instruction, and the translations of its action lists are added to the pose (clipped to
ROLLOUT_BOX) until the pose is within SUCCESS_RADIUS_M of the goal or `max_steps` answers were
given. Without franky-sim a step costs one render and one answer, and the states are those of the
closed loop up to the arm's tracking lag. Frames kept: every visited pose within NEAR_M of the goal,
every other one farther away, never the start pose (the data has it). Each is written under two
image names, so that training draws it twice as often as any other frame. No torch here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molmoact_edge.export.demo_data import CHUNK, START_EE, ArmPoser, action_strings, write_frame
from molmoact_edge.hardware.scene import SUCCESS_RADIUS_M, TRAIN_SEEDS_BELOW, Scene

ROLLOUT_BOX = (np.array([0.30, -0.30, 0.12]), np.array([0.70, 0.30, 0.56]))  # base frame, metres
NEAR_M = 0.08  # within this of the goal every visited pose is kept: where episodes are won or lost
MAX_STEPS = 45  # answers per rollout: 90 actions, three times what the expert needs from the start pose

Act = Callable[[np.ndarray, str], np.ndarray]  # (RGB image, instruction) -> (n, 7) actions


@dataclass
class Rollout:
    poses: list[np.ndarray]  # every pose rendered, the start pose first
    frames: list[tuple[np.ndarray, np.ndarray]]  # (RGB, depth in metres) at each pose
    reached: bool


def rollout(scene: Scene, renderer, act: Act, max_steps: int = MAX_STEPS) -> Rollout:
    """Roll `act` out from franky-sim's start pose in `scene`, rendered by `renderer`."""
    goal = scene.target_object.goal
    poser = ArmPoser(renderer)
    pose = np.array(START_EE, float)
    out = Rollout([], [], False)
    while True:
        out.poses.append(pose.copy())
        out.frames.append(renderer.render(poser.pose(pose)))
        if np.linalg.norm(pose - goal) <= SUCCESS_RADIUS_M:
            out.reached = True
            break
        if len(out.poses) > max_steps:
            break  # max_steps answers given
        actions = np.asarray(act(out.frames[-1][0], scene.instruction), float).reshape(-1, 7)
        if actions.size == 0:
            break  # no action parsed: the policy said nothing this step could execute
        pose = np.clip(pose + actions[:, :3].sum(0), *ROLLOUT_BOX)
    return out


def kept(poses: list[np.ndarray], goal: np.ndarray) -> list[int]:
    """Which visited poses become frames: all near the goal, every other one farther away."""
    return [j for j, p in enumerate(poses)
            if j > 0 and (np.linalg.norm(p - goal) <= NEAR_M or j % 2 == 0)]


def add_rollouts(data_dir: str | Path, bundle: str | Path, seeds, tokenizer, max_steps: int = MAX_STEPS,
                 threads: int | None = None, progress=lambda *a: None) -> dict:
    """Roll the bundle out on the three-object training scenes `seeds` and append the kept poses'
    expert-labelled samples to data_dir/samples.jsonl (images under data_dir/images, named after
    the bundle so that rounds with other bundles add frames instead of replacing them)."""
    from molmoact_edge.hardware.render_camera import SceneRenderer
    from molmoact_edge.runtime.engine.pipeline import open_bundle

    bad = [s for s in seeds if not (0 <= s < TRAIN_SEEDS_BELOW)]
    if bad:
        raise ValueError(f"rollout seeds must be training seeds, in [0, {TRAIN_SEEDS_BELOW}), got {bad[:5]}")
    data = Path(data_dir)
    if not (data / "samples.jsonl").exists():
        raise FileNotFoundError(f"{data} holds no samples.jsonl to add rollout frames to; render the expert data first")
    tag = hashlib.sha256((Path(bundle) / "manifest.json").read_bytes()).hexdigest()[:8]
    table = action_strings(tokenizer)
    summary = {"bundle": str(bundle), "scenes": 0, "reached": 0, "images": 0, "samples": 0}
    with open_bundle(bundle, threads=threads) as pipe, open(data / "samples.jsonl", "a") as f:
        def act(rgb: np.ndarray, instruction: str) -> np.ndarray:
            return np.asarray(pipe.act([rgb], instruction, max_new_tokens=512, max_actions=CHUNK).actions)

        for seed in seeds:
            scene = Scene.from_seed(seed)
            renderer = SceneRenderer(scene)
            try:
                run = rollout(scene, renderer, act, max_steps)
            finally:
                renderer.close()
            for j in kept(run.poses, scene.target_object.goal):
                # Two names: each visited pose is sampled twice as often as an expert frame.
                names = [f"images/{seed:04d}-{tag}-{j:02d}{copy}.png" for copy in ("a", "b")]
                summary["samples"] += write_frame(f, data, scene, run.poses[j], *run.frames[j], names, table)
                summary["images"] += 1
            f.flush()
            summary["scenes"] += 1
            summary["reached"] += run.reached
            progress(f"rollout seed {seed}: {'reached the goal' if run.reached else 'did not reach the goal'} "
                     f"in {len(run.poses) - 1} steps; {summary['images']} frames so far")
    return summary
