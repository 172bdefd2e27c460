"""Expert data for the demo policy, in MolmoAct's exact output format.

Each sample is (rendered scene image, instruction, answer); every image is written once per object
in its scene, each object named in turn (`frame_records`). The answer uses the official glue
wording (the fixture's `action_parsing.json` text 0) and:

* depth: a FIXED, documented stand-in for MolmoAct's depth VQ-VAE. The rendered depth (metres) is
  averaged over a 10x10 grid of image blocks (row-major) and each block mean is binned linearly
  over [DEPTH_NEAR_M, DEPTH_FAR_M] into the 128 codes: code = floor((d - near) / (far - near) * 128),
  clipped. 100 codes, codebook 128, as the real tokenizer's <DEPTH_k> tokens.
* trace: where the end effector is going, projected into the image: TRACE_POINTS points evenly
  spaced on the straight segment from the current end effector to the object's top (not the
  expert's own path, which reaches the goal's height first), written in
  the official trace coordinates (integers 0..255 over the image: v = round(px / (W - 1) * 255)).
* actions: the privileged expert's chunk from this pose (runtime/control/expert.py: the goal's
  height first, then across; each axis clipped to STEP_M per action): CHUNK lists of 7 values,
  [dx, dy, dz, droll, dpitch, dyaw, gripper], normalised with the dataset's q01/q99 (mask true on
  x, y, z only; rotation is always 0 and the gripper always open: unnormalised, as
  the official parser never de-normalises the last dimension), binned into 256 bins and spelled
  with the action vocabulary (bin b = base vocabulary id base_size - 1 - b), as a flat chunk.

Images are rendered at expert poses without physics: the arm is put in place by inverse kinematics
in the same MJCF franky-sim simulates (gripper pointing down, as franky-sim starts), on the
straight line from franky-sim's start pose to the goal, at random poses in the workspace (so that
the policy also learns to recover from where its own mistakes take it) and, with `hover_samples`,
at random positions at the goal's height (where the expert moves across) and, with
`descent_samples`, on the expert's way down from the start pose and, with `near_goal_samples`,
within NEAR_GOAL_M of the goal at its height (where the expert's steps shrink). Seeds below
`TRAIN_SEEDS_BELOW` only. No torch here: the training side (export/train_demo.py) reads the
samples.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from molmoact_edge.hardware.scene import TRAIN_SEEDS_BELOW, Scene, camera_intrinsics, project
from molmoact_edge.runtime.control.expert import DEMO_UNNORM_KEY, ExpertConfig, expert_actions

DEPTH_NEAR_M = 0.3
DEPTH_FAR_M = 1.8
DEPTH_GRID = 10
DEPTH_CODEBOOK = 128
TRACE_POINTS = 5
# Two actions a step (0.2 s of motion at 10 Hz): the policy looks again after every 2 cm per axis,
# so a misjudged step costs little, and the answer is 6 decisions x (8 - 2) shorter than with 8.
CHUNK = 2
N_BINS = 256
START_EE = (0.5544, 0.0, 0.5214)  # franky-sim's start pose of the end effector (base frame, measured)
TCP_OFFSET_M = 0.1034  # hand body -> franky's end-effector point, along the hand's z axis
GRIPPER_OPEN = 1.0
STEP_M = ExpertConfig(goal=(0.0, 0.0, 0.0)).step_m
NEAR_GOAL_M = 0.05  # half-width of the square around the goal that near_goal_samples draw from

DEPTH_GLUE = "The depth map of the first image is "
TRACE_GLUE = ". The trajectory of the end effector in the first image is "
ACTION_GLUE = (". Based on these information, along with other images from different camera views as additional "
               "information, the action that the robot should take is ")
END_GLUE = "."

# The action statistics of this dataset, fixed by the expert's design rather than measured: every
# translation step lies in [-STEP_M, STEP_M]. Stored as config.json norm_stats[DEMO_UNNORM_KEY].
NORM_STATS = {
    DEMO_UNNORM_KEY: {
        "action": {
            "q01": [-STEP_M, -STEP_M, -STEP_M, 0.0, 0.0, 0.0, 0.0],
            "q99": [STEP_M, STEP_M, STEP_M, 0.0, 0.0, 0.0, 1.0],
            "mask": [True, True, True, False, False, False, False],
        },
        "num_transitions": 0,
        "num_trajectories": 0,
    }
}


def depth_codes(depth_m: np.ndarray) -> list[int]:
    h, w = depth_m.shape
    g = DEPTH_GRID
    ys, xs = np.linspace(0, h, g + 1).astype(int), np.linspace(0, w, g + 1).astype(int)
    means = np.array([[depth_m[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean() for j in range(g)] for i in range(g)])
    codes = np.floor((means - DEPTH_NEAR_M) / (DEPTH_FAR_M - DEPTH_NEAR_M) * DEPTH_CODEBOOK)
    return [int(c) for c in np.clip(codes, 0, DEPTH_CODEBOOK - 1).ravel()]


def trace_points(ee: np.ndarray, scene: Scene) -> list[list[int]]:
    o = scene.target_object
    end = o.centre + np.array([0.0, 0.0, o.half_size])
    pts = np.linspace(np.asarray(ee, float), end, TRACE_POINTS)
    intr = camera_intrinsics()
    px = project(pts, intr)
    scaled = np.round(px / np.array([intr.width - 1, intr.height - 1]) * 255)
    return [[int(x), int(y)] for x, y in np.clip(scaled, 0, 255)]


def action_bins(actions: np.ndarray) -> np.ndarray:
    """(n, 7) actions -> bins 0..254 with this dataset's statistics (the inverse of the official decoding)."""
    a = NORM_STATS[DEMO_UNNORM_KEY]["action"]
    q01, q99, mask = (np.asarray(a[k], float) for k in ("q01", "q99", "mask"))
    mask = mask.astype(bool)
    span = np.where(mask, q99 - q01, 1.0)
    v = np.where(mask, 2.0 * (actions - q01) / span - 1.0, actions)
    v = np.clip(v, -1.0, 1.0)
    centres = (np.linspace(-1, 1, N_BINS)[:-1] + np.linspace(-1, 1, N_BINS)[1:]) / 2  # 255 centres
    return np.abs(v[..., None] - centres).argmin(-1)


def answer_text(codes: list[int], trace: list[list[int]], bins: np.ndarray, action_strings: list[str]) -> str:
    """The full answer in the official wording; `action_strings[b]` spells bin b."""
    depth = "<DEPTH_START>" + "".join(f"<DEPTH_{c}>" for c in codes) + "<DEPTH_END>"
    tr = "[" + ", ".join(f"[{x}, {y}]" for x, y in trace) + "]"
    lists = ", ".join("[" + ", ".join(action_strings[b] for b in row) + "]" for row in bins)
    return f"{DEPTH_GLUE}{depth}{TRACE_GLUE}{tr}{ACTION_GLUE}{lists}{END_GLUE}"


def action_strings(tokenizer) -> list[str]:
    base = tokenizer.special.base_vocab_size
    return [tokenizer.id_to_token(base - 1 - b) for b in range(N_BINS)]


class ArmPoser:
    """Puts the rendered arm's end effector at a position (gripper down) by damped least squares."""

    def __init__(self, renderer) -> None:
        import mujoco

        self._mj = mujoco
        self.r = renderer
        m, d = renderer.model, renderer.data
        self.hand = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "robot0_hand")
        self.q0 = np.array([0.0, 0.0, 0.0, -1.57, 0.0, 1.57, 0.785])
        d.qpos[:] = 0
        d.qpos[:7] = self.q0
        d.qpos[7:9] = 0.02
        mujoco.mj_kinematics(m, d)
        self.R_down = d.xmat[self.hand].reshape(3, 3).copy()
        self.lo, self.hi = m.jnt_range[:7, 0], m.jnt_range[:7, 1]

    def pose(self, ee: np.ndarray, iters: int = 60) -> np.ndarray:
        m, d, mj = self.r.model, self.r.data, self._mj
        d.qpos[:7] = self.q0
        target = np.asarray(ee, float) - self.R_down[:, 2] * TCP_OFFSET_M  # the hand z axis points down
        jp, jr = np.zeros((3, m.nv)), np.zeros((3, m.nv))
        for _ in range(iters):
            mj.mj_kinematics(m, d)
            mj.mj_comPos(m, d)
            R = d.xmat[self.hand].reshape(3, 3)
            ep = target - d.xpos[self.hand]
            er = 0.5 * sum(np.cross(R[:, i], self.R_down[:, i]) for i in range(3))
            if np.linalg.norm(ep) < 1e-4 and np.linalg.norm(er) < 1e-3:
                break
            mj.mj_jacBody(m, d, jp, jr, self.hand)
            J = np.vstack([jp[:, :7], jr[:, :7]])
            e = np.concatenate([ep, er])
            dq = J.T @ np.linalg.solve(J @ J.T + 1e-4 * np.eye(6), e)
            d.qpos[:7] = np.clip(d.qpos[:7] + dq, self.lo, self.hi)
        return d.qpos.copy()


@dataclass(frozen=True)
class DataConfig:
    seeds: tuple[int, ...]
    path_samples: int = 6  # frames on the straight line from the start pose to the named object's goal
    random_samples: int = 4  # frames from random end-effector positions
    # Frames at the goal's height (within a step), from random positions across the workspace: where
    # the expert moves across (it reaches the height first), so where the policy must read x and y.
    hover_samples: int = 0
    # Frames on the expert's way down from the start pose (its x and y within 1 cm, random heights
    # above the goal's; the last one within 2.5 steps of it, where the expert turns to move across).
    descent_samples: int = 0
    # Frames within NEAR_GOAL_M of the goal in x and y, at its height (within a step): where the expert's
    # steps shrink below STEP_M and an episode is won or lost (the policy must stop short, not overshoot).
    near_goal_samples: int = 0
    # Scenes with ONE object (never evaluated): where it lies is then all the image has to tell, a
    # one-step lesson (find the object, read its position) that the three-object scenes' two steps
    # (which object the instruction names, then where it is) build on.
    single_object_seeds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        both = set(self.seeds) & set(self.single_object_seeds)
        if both:
            raise ValueError(f"DataConfig: seeds {sorted(both)[:5]} are both three-object and single-object scenes")
        bad = [s for s in (*self.seeds, *self.single_object_seeds) if not (0 <= s < TRAIN_SEEDS_BELOW)]
        if bad:
            raise ValueError(f"DataConfig.seeds must be in [0, {TRAIN_SEEDS_BELOW}) (evaluation seeds are never "
                             f"trained on), got {bad[:5]}")


def _positions(scene: Scene, cfg: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    goal = scene.target_object.goal
    start = np.asarray(START_EE)
    out = [start + (goal - start) * t for t in np.linspace(0.0, 0.95, cfg.path_samples)]
    for _ in range(cfg.random_samples):
        out.append(np.array([rng.uniform(0.32, 0.65), rng.uniform(-0.28, 0.28), rng.uniform(0.14, 0.55)]))
    for _ in range(cfg.hover_samples):
        dz = rng.uniform(-0.8, 0.8) * STEP_M
        out.append(np.array([rng.uniform(0.32, 0.65), rng.uniform(-0.28, 0.28), goal[2] + dz]))
    for j in range(cfg.descent_samples):
        last = j == cfg.descent_samples - 1
        z = rng.uniform(goal[2] + 0.2 * STEP_M, goal[2] + 2.5 * STEP_M) if last else rng.uniform(goal[2] + STEP_M, start[2])
        out.append(np.array([start[0] + rng.uniform(-0.01, 0.01), start[1] + rng.uniform(-0.01, 0.01), z]))
    for _ in range(cfg.near_goal_samples):
        dx, dy = rng.uniform(-NEAR_GOAL_M, NEAR_GOAL_M, 2)
        out.append(goal + np.array([dx, dy, rng.uniform(-0.8, 0.8) * STEP_M]))
    return out


def generate(out_dir: str | Path, cfg: DataConfig, tokenizer, progress=lambda *a: None) -> Path:
    """Render the samples to out_dir/images/*.png and write out_dir/samples.jsonl; returns out_dir."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    table = action_strings(tokenizer)
    n = 0
    with open(out / "samples.jsonl", "w") as f:
        for seed, n_objects in [(s, 3) for s in cfg.seeds] + [(s, 1) for s in cfg.single_object_seeds]:
            scene = Scene.from_seed(seed, n_objects)
            n += _write_frames(f, out, scene, _positions(scene, cfg, np.random.default_rng(seed + 7919)), table)
            progress(f"seed {seed}: {n} samples")
    (out / "norm_stats.json").write_text(json.dumps(NORM_STATS, indent=2))
    return out


def _write_frames(f, out: Path, scene: Scene, positions: list[np.ndarray], table: list[str]) -> int:
    """Render `scene` with the end effector at each position, save the images under out/images and
    write their `frame_records` to the open samples file `f`; returns how many records."""
    from molmoact_edge.hardware.render_camera import SceneRenderer

    renderer = SceneRenderer(scene)
    try:
        poser = ArmPoser(renderer)
        n = 0
        for k, ee in enumerate(positions):
            rgb, depth = renderer.render(poser.pose(ee))
            n += write_frame(f, out, scene, ee, rgb, depth, [f"images/{scene.seed:04d}-{k:02d}.png"], table)
        return n
    finally:
        renderer.close()


def write_frame(f, out: Path, scene: Scene, ee: np.ndarray, rgb: np.ndarray, depth: np.ndarray, names: list[str],
                table: list[str]) -> int:
    """Save one rendered frame under out/names[0] (further names: hard links to the same file, so that a
    frame is sampled once per name) and write its `frame_records` under each name to the open samples
    file `f`; returns how many records."""
    from PIL import Image

    Image.fromarray(rgb).save(out / names[0])
    for extra in names[1:]:
        if not (out / extra).exists():
            os.link(out / names[0], out / extra)
    codes, n = depth_codes(depth), 0
    for name in names:
        for record in frame_records(scene, ee, name, codes, table):
            f.write(json.dumps(record) + "\n")
            n += 1
    return n


def frame_records(scene: Scene, ee: np.ndarray, image: str, codes: list[int], table: list[str]) -> list[dict]:
    """One sample per object of the scene, each object named in turn: the same image under every
    instruction it can pose. Without this, frames along the path to the named object let the arm's
    own position give the target away, and a policy can score well on the training loss while
    ignoring the instruction (the first trained policy's last trace point did not depend on it)."""
    records = []
    for j, o in enumerate(scene.objects):
        named = replace(scene, target=j)
        bins = action_bins(expert_actions(ee, o.goal, STEP_M, CHUNK))
        records.append({"image": image, "seed": scene.seed, "n_objects": len(scene.objects), "target": j,
                        "instruction": named.instruction,
                        "answer": answer_text(codes, trace_points(ee, named), bins, table),
                        "ee": [float(v) for v in ee], "goal": [float(v) for v in o.goal],
                        "object_px": [float(v) for v in project(o.centre)[0]]})
    return records


def write_probe_set(out_dir: str | Path, seeds, tokenizer, per_seed: int = 1) -> Path:
    """Held-out samples (evaluation scenes, seeds >= 1000) in the training format, each frame under
    every instruction its scene poses, for `Trainer.probe`: measured on, never trained on."""
    _require_held_out(seeds, "probe frames")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    table = action_strings(tokenizer)
    cfg = DataConfig(seeds=(), path_samples=per_seed, random_samples=0)
    with open(out / "samples.jsonl", "w") as f:
        for seed in seeds:
            scene = Scene.from_seed(seed)
            _write_frames(f, out, scene, _positions(scene, cfg, np.random.default_rng(seed)), table)
    return out


def _require_held_out(seeds, what: str) -> None:
    bad = [s for s in seeds if s < TRAIN_SEEDS_BELOW]
    if bad:
        raise ValueError(f"{what} come from seeds >= {TRAIN_SEEDS_BELOW}, got {bad[:5]}")


def read_samples(data_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(data_dir) / "samples.jsonl").read_text().splitlines() if line]


def heldout_frames(seeds, per_seed: int = 2):
    """(rgb, instruction, object_px, ee) at the expert's path poses of evaluation scenes (seeds >= 1000),
    for measuring where the policy's trace ends; never written as training data."""
    from molmoact_edge.hardware.render_camera import SceneRenderer

    _require_held_out(seeds, "held-out frames")
    cfg = DataConfig(seeds=(), path_samples=per_seed, random_samples=0)
    for seed in seeds:
        scene = Scene.from_seed(seed)
        renderer = SceneRenderer(scene)
        poser = ArmPoser(renderer)
        for ee in _positions(scene, cfg, np.random.default_rng(seed)):
            rgb, _ = renderer.render(poser.pose(ee))
            yield rgb, scene.instruction, project(scene.target_object.centre)[0], ee
        renderer.close()
