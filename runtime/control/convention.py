"""The robot-side action convention: what the numbers in a policy's action mean to the arm.

MolmoAct emits 7-D actions [x, y, z, roll, pitch, yaw, gripper] already de-normalised with the
statistics of one dataset (its *unnorm key*). What they mean physically - which frame the deltas
are in, how the rotation is parameterised, which way the gripper value points, how long one action
lasts - is a property of that dataset, never inferred. It is written down here, one preset per key,
and every transform is unit-tested.

Composition rules (pose p, rotation R; delta dp, dR):
- delta_frame="base": p' = p + dp and R' = dR @ R (rotation about base axes, pivoting at the EE).
- delta_frame="ee":   p' = p + R @ dp and R' = R @ dR (the delta expressed in the current EE frame).
A chunk's deltas are chained: target_k = apply(target_{k-1}, a_k), target_{-1} = pose at observation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from molmoact_edge.hardware.geometry import (
    Pose,
    euler_xyz_to_quat,
    quat_multiply,
    quat_to_matrix,
    rotvec_to_quat,
)

DELTA_FRAMES = ("base", "ee")
ROTATIONS = ("euler_xyz", "rotvec", "none")
GRIPPER_SIGNS = ("open_positive", "close_positive")


@dataclass(frozen=True)
class ActionConvention:
    """How one policy's actions map onto a Cartesian arm. Defaults: the Open-X (RLDS) convention."""

    delta_frame: str = "base"
    rotation: str = "euler_xyz"  # extrinsic roll/pitch/yaw (radians) about base x, y, z
    translation_scale: float = 1.0  # metres per action unit
    rotation_scale: float = 1.0  # radians per action unit
    # open_positive: high value = open (Open-X after the OpenVLA/RLDS transforms: 1 open, 0 closed).
    gripper: str = "open_positive"
    gripper_low: float = 0.0  # the gripper value range, used to normalise to closedness in [0, 1]
    gripper_high: float = 1.0
    control_period_s: float = 0.2  # how long one action lasts on the robot (1 / dataset rate)
    action_dim: int = 7

    def __post_init__(self) -> None:
        if self.delta_frame not in DELTA_FRAMES:
            raise ValueError(f"ActionConvention.delta_frame must be one of {DELTA_FRAMES}, got {self.delta_frame!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"ActionConvention.rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.gripper not in GRIPPER_SIGNS:
            raise ValueError(f"ActionConvention.gripper must be one of {GRIPPER_SIGNS}, got {self.gripper!r}")
        if not self.gripper_high > self.gripper_low:
            raise ValueError(f"ActionConvention.gripper_high ({self.gripper_high}) must exceed gripper_low ({self.gripper_low})")
        if not (0.005 <= self.control_period_s <= 2.0):
            raise ValueError(f"ActionConvention.control_period_s must be in [0.005, 2] s, got {self.control_period_s}")
        if self.translation_scale <= 0 or self.rotation_scale <= 0:
            raise ValueError("ActionConvention.translation_scale and rotation_scale must be positive")
        if self.action_dim != 7:
            raise ValueError(f"ActionConvention.action_dim must be 7 (xyz, 3 rotation, gripper), got {self.action_dim}")

    # -- the transforms
    def delta_rotation(self, rot: np.ndarray) -> np.ndarray:
        """The rotation part of an action as a quaternion (x, y, z, w)."""
        r = np.asarray(rot, dtype=np.float64) * self.rotation_scale
        if self.rotation == "euler_xyz":
            return euler_xyz_to_quat(r)
        if self.rotation == "rotvec":
            return rotvec_to_quat(r)
        return np.array([0.0, 0.0, 0.0, 1.0])

    def apply(self, pose: Pose, action: np.ndarray) -> Pose:
        """The pose reached by applying one action's delta to `pose`."""
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (self.action_dim,):
            raise ValueError(f"action must have shape ({self.action_dim},), got {a.shape}")
        dp = a[:3] * self.translation_scale
        dq = self.delta_rotation(a[3:6])
        if self.delta_frame == "base":
            return Pose(tuple(pose.p + dp), tuple(quat_multiply(dq, pose.q)))
        return Pose(tuple(pose.p + quat_to_matrix(pose.q) @ dp), tuple(quat_multiply(pose.q, dq)))

    def targets(self, anchor: Pose, actions: np.ndarray) -> list[Pose]:
        """Absolute base-frame targets of a chunk, chained from the pose at observation time."""
        out, pose = [], anchor
        for a in np.asarray(actions, dtype=np.float64):
            pose = self.apply(pose, a)
            out.append(pose)
        return out

    def closedness(self, gripper_value: float) -> float:
        """The gripper value as closedness in [0, 1] (0 open, 1 closed), whatever the sign convention."""
        v = (float(gripper_value) - self.gripper_low) / (self.gripper_high - self.gripper_low)
        v = min(1.0, max(0.0, v))
        return 1.0 - v if self.gripper == "open_positive" else v


# One preset per unnorm key of the released checkpoints (MOLMOACT.md section 8). The frames,
# rotation parameterisations, gripper signs and rates are those of the source datasets as
# released through Open-X/RLDS and OpenVLA's LIBERO conversion; they are assumptions to confirm on
# the robot with `--policy scripted` before trusting a model with them.
_OPENX = ActionConvention()
CONVENTIONS: dict[str, ActionConvention] = {
    # MolmoAct's own mid-training mixture: Open-X style deltas; 10 Hz assumed (to be confirmed).
    "molmoact": replace(_OPENX, control_period_s=0.1),
    # Google RT-1 robot: base-frame deltas, roll/pitch/yaw, 3 Hz.
    "fractal20220817_data": replace(_OPENX, control_period_s=1 / 3),
    # WidowX BridgeData V2: base-frame deltas, roll/pitch/yaw, 5 Hz.
    "bridge_orig": replace(_OPENX, control_period_s=0.2),
}
# The demo policy's simulated tabletop (runtime/control/expert.py, hardware/scene.py): base-frame
# deltas in metres, no rotation (the gripper stays pointing down), 1 = open, 10 Hz.
CONVENTIONS["franka_tabletop_demo"] = replace(_OPENX, control_period_s=0.1)
for _suite in ("spatial", "object", "goal", "10"):
    # LIBERO (robosuite OSC_POSE): inputs in [-1, 1] scaled by 0.05 m and 0.5 rad, axis-angle
    # rotation, 20 Hz; OpenVLA's conversion flips the gripper to 1 open / 0 closed.
    CONVENTIONS[f"libero_{_suite}_no_noops_modified"] = replace(
        _OPENX, rotation="rotvec", translation_scale=0.05, rotation_scale=0.5, control_period_s=0.05
    )


def convention_for(unnorm_key: str) -> ActionConvention:
    try:
        return CONVENTIONS[unnorm_key]
    except KeyError:
        raise ValueError(
            f"no action convention for unnorm key {unnorm_key!r}; known: {sorted(CONVENTIONS)}. Add one to "
            "molmoact_edge.runtime.control.convention.CONVENTIONS (frame, rotation, gripper sign, control period)."
        ) from None
