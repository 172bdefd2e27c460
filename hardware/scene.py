"""A seeded tabletop scene for the simulated Franka: coloured objects, a fixed camera, one task.

The task family is "move to the <colour> <shape>": a few objects of distinct colours (and shapes) lie in
front of the arm, one of them is named, and the episode succeeds when the end effector comes within
`SUCCESS_RADIUS_M` of a point `HOVER_M` above that object's top. Everything here is pure data and
geometry (numpy only): the MuJoCo XML that franky-sim's scene is extended with, the camera's
pinhole intrinsics and its world-to-pixel projection. The same `Scene` is built in the franky-sim
process (physics) and in the camera (rendering) from the seed alone, so both see one world.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

from .camera import Intrinsics

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("cube", "ball", "cylinder")
SUCCESS_RADIUS_M = 0.03
HOVER_M = 0.10  # the goal point sits this far above the object's top (the hand never touches it)
EPISODE_LIMIT_S = 30.0
TRAIN_SEEDS_BELOW = 1000  # seeds < 1000 may be trained on; evaluation uses seeds >= 1000

# Where objects may lie (base frame, metres): in front of the arm, inside the default workspace box.
_X_RANGE = (0.35, 0.60)
_Y_RANGE = (-0.22, 0.22)
_MIN_GAP_M = 0.16
_HALF_SIZE_M = 0.045

# The fixed scene camera: in front of and above the arm, looking back at the table.
CAMERA_POS = (1.05, 0.0, 0.70)
CAMERA_LOOKAT = (0.47, 0.0, 0.16)
CAMERA_FOVY_DEG = 50.0
IMAGE_SIZE = (320, 240)  # width, height


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    xy: tuple[float, float]
    half_size: float = _HALF_SIZE_M

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> np.ndarray:
        return np.array([self.xy[0], self.xy[1], self.half_size])

    @property
    def goal(self) -> np.ndarray:
        """The point above the object that the end effector must reach."""
        return np.array([self.xy[0], self.xy[1], 2 * self.half_size + HOVER_M])


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[SceneObject, ...]
    target: int  # index into objects

    @property
    def target_object(self) -> SceneObject:
        return self.objects[self.target]

    @property
    def instruction(self) -> str:
        return f"move to the {self.target_object.name}"

    @classmethod
    def from_seed(cls, seed: int, n_objects: int = 3) -> Scene:
        """Objects of distinct colours, and of distinct shapes while there are enough shapes, so
        that the colour word alone names the object (and so does the shape word, up to three
        objects). With colour/shape pairs drawn freely, a third of the named objects shared their
        colour with a distractor and could only be told apart by a shape seen in two image tokens."""
        if not (1 <= n_objects <= len(COLOURS)):  # one object: training data only (see export/demo_data.py)
            raise ValueError(f"Scene n_objects must be in [1, {len(COLOURS)}] (one colour each), got {n_objects}")
        if seed < 0:
            raise ValueError(f"Scene seed must be >= 0, got {seed}")
        rng = np.random.default_rng(seed)
        colours = [list(COLOURS)[k] for k in rng.choice(len(COLOURS), size=n_objects, replace=False)]
        shapes = [SHAPES[k] for k in rng.choice(len(SHAPES), size=n_objects, replace=n_objects > len(SHAPES))]
        placed: list[np.ndarray] = []
        while len(placed) < n_objects:
            xy = np.array([rng.uniform(*_X_RANGE), rng.uniform(*_Y_RANGE)])
            if all(np.linalg.norm(xy - p) >= _MIN_GAP_M for p in placed):
                placed.append(xy)
        objects = tuple(SceneObject(c, s, (float(p[0]), float(p[1]))) for c, s, p in zip(colours, shapes, placed))
        return cls(seed, objects, int(rng.integers(n_objects)))

    def to_dict(self) -> dict:
        return {"seed": self.seed, "instruction": self.instruction, "target": self.target,
                "objects": [{"colour": o.colour, "shape": o.shape, "xy": list(o.xy)} for o in self.objects]}


# A plain tabletop under the objects, filling the camera's view: franky-sim's floor is a blue
# checkerboard, against which a blue object hardly shows and whose squares make every patch of the
# image look like an object.
TABLE_RGBA = (0.72, 0.70, 0.66, 1.0)
_TABLE_CENTRE = (0.0, 0.0)
_TABLE_HALF = (2.5, 2.5)
_TABLE_TOP_M = 0.0005  # just above the floor plane (no z-fighting); objects rest on the floor


def extend_mjcf(worldbody: ET.Element, scene: Scene) -> None:
    """Add the table, the scene's objects and camera to franky-sim's MuJoCo world (before it starts)."""
    ET.SubElement(worldbody, "geom", name="table", type="box", rgba=_fmt(TABLE_RGBA), contype="0", conaffinity="0",
                  pos=_fmt((*_TABLE_CENTRE, _TABLE_TOP_M / 2)), size=_fmt((*_TABLE_HALF, _TABLE_TOP_M / 2)))
    for i, o in enumerate(scene.objects):
        body = ET.SubElement(worldbody, "body", name=f"object{i}", pos=_fmt(o.centre))
        r, g, b = COLOURS[o.colour]
        common = {"name": f"object{i}_geom", "rgba": f"{r} {g} {b} 1", "contype": "0", "conaffinity": "0"}
        h = o.half_size
        if o.shape == "cube":
            ET.SubElement(body, "geom", type="box", size=f"{h} {h} {h}", **common)
        elif o.shape == "ball":
            ET.SubElement(body, "geom", type="sphere", size=f"{h}", **common)
        else:
            ET.SubElement(body, "geom", type="cylinder", size=f"{h} {h}", **common)
    cam = camera_pose()
    ET.SubElement(worldbody, "camera", name="scene_cam", mode="fixed", pos=_fmt(CAMERA_POS),
                  xyaxes=_fmt(np.concatenate([cam[:, 0], -cam[:, 1]])), fovy=str(CAMERA_FOVY_DEG))


def _fmt(v) -> str:
    return " ".join(f"{float(x):.6f}" for x in v)


def camera_pose() -> np.ndarray:
    """3x3 rotation whose columns are the camera's right, down and forward axes in the world (the
    OpenCV convention that `project` uses; MuJoCo's camera looks along -z with y up)."""
    fwd = np.asarray(CAMERA_LOOKAT, float) - np.asarray(CAMERA_POS, float)
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    return np.stack([right, down, fwd], axis=1)


def camera_intrinsics(width: int = IMAGE_SIZE[0], height: int = IMAGE_SIZE[1]) -> Intrinsics:
    # MuJoCo's fovy is the vertical field of view; pixels are square.
    f = height / (2.0 * np.tan(np.radians(CAMERA_FOVY_DEG) / 2.0))
    return Intrinsics(width, height, float(f), float(f), width / 2.0, height / 2.0)


def project(points_world: np.ndarray, intr: Intrinsics | None = None) -> np.ndarray:
    """World (= robot base) points (N, 3) to pixel coordinates (N, 2) in the scene camera's image."""
    intr = intr or camera_intrinsics()
    p = np.atleast_2d(np.asarray(points_world, float)) - np.asarray(CAMERA_POS, float)
    c = p @ camera_pose()  # camera-frame coordinates (x right, y down, z forward)
    if np.any(c[:, 2] <= 0):
        raise ValueError("a point behind the scene camera cannot be projected")
    return np.stack([intr.fx * c[:, 0] / c[:, 2] + intr.ppx, intr.fy * c[:, 1] / c[:, 2] + intr.ppy], axis=1)
