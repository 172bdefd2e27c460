"""The safety layer between the plan and the arm: every target passes through `SafetyLayer.filter`.

What it guarantees for every commanded target, whatever the policy produced (`previous` is the last
command, `current` the MEASURED pose):
- finite numbers (a non-finite target is refused, never clamped into something plausible);
- at most `max_step_m` of translation and `max_step_rad` of rotation away from the previous
  command, always: no other clamp may jump further (larger moves are shortened along their way);
- inside the workspace box; when the previous command lies outside it (the arm started there),
  the target walks back toward the box at the step limit instead of jumping onto it;
- within `max_lead_m` of the measured position (or no farther than the previous command, when
  the arm itself moved away): a stuck or lagging arm holds the command back instead of letting it
  run ahead (a released arm would otherwise leap to the far target); the bound only ever holds a
  target back, it never drags it after the arm;
- within `max_lead_rad` of the measured orientation, in the same way (a stuck wrist cannot wind up
  a large turn that a released arm would then make at once);
- its tool axis (the gripper's z axis) within `max_tilt_rad` of the tool axis at the start pose
  (rotation about the tool axis is free), so no policy can turn the gripper up or sideways;
- within the arm's reach: the wrist (the point `wrist_offset_m` behind the target along its tool
  axis) stays within `max_reach_m` of the shoulder. The box alone does not ensure that: its top
  front corner lies 0.95 m from the shoulder with the gripper down, farther than a Panda/FR3 can
  stretch (0.79 m, measured on franky-sim's FR3 model), and near full stretch the arm is singular:
  franky-sim's inverse kinematics then throws the joints about and a real arm stops with a reflex.
`check_measured` watches the arm itself: the measured position leaving the box by more than
`box_margin_m` is a fault that stops the run. franky's planner can carry the arm past a target
(the sim tests measure this overshoot), which is what the margin allows for.
The dynamics factor (franky's velocity/acceleration/jerk scale) is part of this config because it
is a safety limit too; the arm driver receives it at connect time. The hardware emergency stop and
the controller's own reflexes stay in charge above all of this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from molmoact_edge.hardware.geometry import (
    Pose,
    quat_angle,
    quat_multiply,
    quat_normalize,
    quat_slerp,
    quat_to_matrix,
    rotvec_to_quat,
)


@dataclass(frozen=True)
class SafetyConfig:
    # A box in the robot base frame (metres) that keeps a Panda/FR3 in front of its base, above the
    # table and within reach; narrow it to the actual cell before running a model.
    workspace_min: tuple[float, float, float] = (0.25, -0.40, 0.05)
    workspace_max: tuple[float, float, float] = (0.75, 0.40, 0.70)
    max_speed_m_s: float = 0.25  # translation per executor step = max_speed_m_s * period
    max_rot_speed_rad_s: float = 1.0
    dynamics_factor: float = 0.1
    max_dynamics_factor: float = 0.5  # refuse configs that would let the arm run faster than this
    gripper_hysteresis: float = 0.2  # closedness band: close above 0.5 + h/2, open below 0.5 - h/2
    # The command may lead the measured position by this much. In franky-sim a scripted 0.1 m/s
    # stream at dynamics 0.2 leads the arm by up to 3.3 cm, so 5 cm never holds back normal motion
    # while a stuck arm cannot build up more than 5 cm of spring (README, safety).
    max_lead_m: float = 0.05
    # The commanded orientation may lead the measured one by this angle. Derived, not measured: the
    # ~0.33 s of lag behind the position stream (3.3 cm at 0.1 m/s), at the default 1 rad/s rotation
    # limit, is 0.33 rad; 20 degrees (0.349 rad) allows that, and a stuck wrist cannot wind up more.
    max_lead_rad: float = 0.3491  # 20 degrees
    # Cone around the tool axis at the start pose: tabletop grasps tilt the gripper, they never
    # need it turned sideways or up.
    max_tilt_rad: float = 0.7854  # 45 degrees
    # The measured position this far outside the box stops the run. franky's planner carried the
    # franky-sim arm up to 40 mm past a box face at the defaults (dynamics 0.1, 0.25 m/s; README).
    box_margin_m: float = 0.05
    # Reach: the wrist point (on the tool axis, this far behind the TCP: a Panda/FR3 flange 0.107 m
    # plus the Franka Hand's TCP 0.1034 m) stays within max_reach_m of the shoulder (joint 2's axis,
    # 0.333 m above the base). On franky-sim's FR3 the arm stretches out (elbow joint 4 at -0.47 rad,
    # the Jacobian's smallest singular value 0.002) with that distance at 0.784-0.794 m; 0.75 m
    # keeps the smallest singular value near 0.09 (elbow about -1.1 rad). The start pose of franky-sim
    # lies at 0.683 m. None turns the bound off (another arm, or a tool of another length: set both).
    max_reach_m: float | None = 0.75
    wrist_offset_m: float = 0.2104
    shoulder: tuple[float, float, float] = (0.0, 0.0, 0.333)

    def __post_init__(self) -> None:
        lo, hi = np.asarray(self.workspace_min, float), np.asarray(self.workspace_max, float)
        if lo.shape != (3,) or hi.shape != (3,) or not np.all(np.isfinite(lo)) or not np.all(np.isfinite(hi)):
            raise ValueError("SafetyConfig.workspace_min/max must be three finite numbers each (metres, base frame)")
        if not np.all(hi > lo):
            raise ValueError(f"SafetyConfig.workspace_max {self.workspace_max} must exceed workspace_min {self.workspace_min} on every axis")
        if not (0.0 < self.max_speed_m_s <= 1.0):
            raise ValueError(f"SafetyConfig.max_speed_m_s must be in (0, 1] m/s, got {self.max_speed_m_s}")
        if not (0.0 < self.max_rot_speed_rad_s <= 3.0):
            raise ValueError(f"SafetyConfig.max_rot_speed_rad_s must be in (0, 3] rad/s, got {self.max_rot_speed_rad_s}")
        if not (0.0 < self.max_dynamics_factor <= 1.0):
            raise ValueError(f"SafetyConfig.max_dynamics_factor must be in (0, 1], got {self.max_dynamics_factor}")
        if not (0.0 < self.dynamics_factor <= self.max_dynamics_factor):
            raise ValueError(f"SafetyConfig.dynamics_factor must be in (0, max_dynamics_factor={self.max_dynamics_factor}], got {self.dynamics_factor}")
        if not (0.005 <= self.max_lead_m <= 0.5):
            raise ValueError(f"SafetyConfig.max_lead_m must be in [0.005, 0.5] m, got {self.max_lead_m}")
        if not (0.01 <= self.max_lead_rad <= np.pi):
            raise ValueError(f"SafetyConfig.max_lead_rad must be in [0.01, pi] rad, got {self.max_lead_rad}")
        if not (0.0 < self.max_tilt_rad <= np.pi):
            raise ValueError(f"SafetyConfig.max_tilt_rad must be in (0, pi] rad, got {self.max_tilt_rad}")
        if not (0.0 <= self.box_margin_m <= 0.5):
            raise ValueError(f"SafetyConfig.box_margin_m must be in [0, 0.5] m, got {self.box_margin_m}")
        if self.max_reach_m is not None and not (0.2 <= self.max_reach_m <= 1.5):
            raise ValueError(f"SafetyConfig.max_reach_m must be in [0.2, 1.5] m or None, got {self.max_reach_m}")
        if not (0.0 <= self.wrist_offset_m <= 0.5):
            raise ValueError(f"SafetyConfig.wrist_offset_m must be in [0, 0.5] m, got {self.wrist_offset_m}")
        if not (0.0 <= self.gripper_hysteresis < 1.0):
            raise ValueError(f"SafetyConfig.gripper_hysteresis must be in [0, 1), got {self.gripper_hysteresis}")

    def contains(self, p: np.ndarray, tol: float = 1e-9) -> bool:
        return bool(np.all(p >= np.asarray(self.workspace_min) - tol) and np.all(p <= np.asarray(self.workspace_max) + tol))

    def outside_by(self, p: np.ndarray) -> float:
        """How far (metres, Euclidean) `p` lies outside the box; 0 inside."""
        p = np.asarray(p, float)
        gap = np.maximum(np.asarray(self.workspace_min) - p, 0) + np.maximum(p - np.asarray(self.workspace_max), 0)
        return float(np.linalg.norm(gap))


def tool_axis(q: np.ndarray) -> np.ndarray:
    """The gripper's approach direction (its z axis) in the base frame."""
    return quat_to_matrix(q)[:, 2]


def tilt(q: np.ndarray, axis0: np.ndarray) -> float:
    """Angle between the tool axis of `q` and `axis0` (radians)."""
    return float(np.arccos(np.clip(np.dot(tool_axis(q), axis0), -1.0, 1.0)))


def _limit(v: np.ndarray, n_max: float) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v if n <= n_max else v * (n_max / n)


@dataclass
class Filtered:
    target: Pose | None  # None: refused
    interventions: list[str] = field(default_factory=list)


class SafetyLayer:
    def __init__(self, config: SafetyConfig, period_s: float) -> None:
        self.config = config
        self.period_s = period_s
        self.max_step_m = config.max_speed_m_s * period_s
        self.max_step_rad = config.max_rot_speed_rad_s * period_s
        self.counts: dict[str, int] = {}
        self.axis0: np.ndarray | None = None  # tool axis at the start pose

    def anchor(self, start: Pose) -> None:
        """Fix the orientation cone around the tool axis of the pose the run starts from."""
        self.axis0 = tool_axis(start.q)

    def _count(self, f: Filtered, what: str) -> None:
        f.interventions.append(what)
        self.counts[what] = self.counts.get(what, 0) + 1

    def _goal(self, p: np.ndarray, q: np.ndarray, out: Filtered) -> np.ndarray:
        """`p` moved to the nearest point (for the tool orientation `q`) that lies in the box and
        within reach. Both sets are convex (for a fixed `q` the reach is a ball around the shoulder
        shifted by the wrist offset), so alternating projections converge to a point of both."""
        c = self.config
        lo, hi = np.asarray(c.workspace_min), np.asarray(c.workspace_max)
        goal = np.clip(p, lo, hi)
        if not np.array_equal(goal, p):
            self._count(out, "workspace_clamp")
        if c.max_reach_m is None:
            return goal
        centre = np.asarray(c.shoulder, float) + c.wrist_offset_m * tool_axis(q)  # where the wrist is at the shoulder
        if np.linalg.norm(goal - centre) <= c.max_reach_m:
            return goal
        self._count(out, "reach_clamp")
        for _ in range(50):
            rel = goal - centre
            n = float(np.linalg.norm(rel))
            if n > c.max_reach_m:
                goal = centre + rel * (c.max_reach_m / n)
            clipped = np.clip(goal, lo, hi)
            if np.array_equal(clipped, goal):
                break
            goal = clipped
        return goal

    def check_measured(self, current: Pose) -> str | None:
        """Why the measured pose must stop the run, or None."""
        out = self.config.outside_by(current.p)
        if out > self.config.box_margin_m:
            return (f"the arm is {1000 * out:.0f} mm outside the workspace box (margin {1000 * self.config.box_margin_m:.0f} mm) "
                    f"at {np.round(current.p, 3).tolist()}: an external push, a planner overshoot or a box that "
                    "does not contain the start pose; move the arm into the box or widen --workspace")
        return None

    def _cone(self, q: np.ndarray, out: Filtered) -> np.ndarray:
        """`q` turned (about the base frame) just enough to bring its tool axis inside the cone."""
        a = tool_axis(q)
        angle = float(np.arccos(np.clip(np.dot(a, self.axis0), -1.0, 1.0)))
        if angle <= self.config.max_tilt_rad:
            return q
        n = np.cross(a, self.axis0)
        if np.linalg.norm(n) < 1e-9:  # pointing exactly away: any perpendicular axis brings it back
            n = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
        n = n / np.linalg.norm(n)
        self._count(out, "tilt_clamp")
        return quat_normalize(quat_multiply(rotvec_to_quat(n * (angle - self.config.max_tilt_rad)), q))

    def _hold_lead(self, prev: np.ndarray, step: np.ndarray, arm: np.ndarray, out: Filtered) -> np.ndarray:
        """Shorten `step` so that the target ends within max_lead_m of the measured position `arm`
        (or no farther than the previous command was, if that was already farther).

        Only ever shortens: the target is never pulled toward the arm. Pulling it along would make
        the command chase an arm that overshoots or is pushed away, which drives it further.
        """
        radius = max(self.config.max_lead_m, float(np.linalg.norm(prev - arm)))
        rel = prev - arm
        if float(np.linalg.norm(rel + step)) <= radius:
            return step
        self._count(out, "lead_clamp")
        # Largest alpha in [0, 1] with |rel + alpha * step| <= radius (alpha = 0 qualifies).
        a, b, k = float(step @ step), float(step @ rel), float(rel @ rel) - radius * radius
        alpha = (-b + np.sqrt(max(b * b - a * k, 0.0))) / a
        return step * min(1.0, max(0.0, alpha))

    def _hold_turn(self, prev: np.ndarray, q: np.ndarray, arm: np.ndarray, out: Filtered) -> np.ndarray:
        """`q` moved back along its way from `prev` until it is within max_lead_rad of the measured
        orientation `arm` (or no farther than `prev` was). Like `_hold_lead`, it only ever holds back."""
        radius = max(self.config.max_lead_rad, quat_angle(prev, arm))
        if quat_angle(q, arm) <= radius:
            return q
        self._count(out, "turn_lead_clamp")
        # The angle to `arm` along the short arc from prev (inside the radius) to q (outside) crosses
        # the radius once before q; bisect for that crossing, keeping the inside end.
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            if quat_angle(quat_slerp(prev, q, mid), arm) <= radius:
                lo = mid
            else:
                hi = mid
        return quat_slerp(prev, q, lo)

    def filter(self, desired: Pose, previous: Pose, current: Pose | None = None) -> Filtered:
        """The target to command this step, given the desired one, the previous command and the
        measured pose (`current`; None only in tests of the step limits alone)."""
        out = Filtered(target=None)
        p, q = desired.p, desired.q
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(q))):
            self._count(out, "nonfinite_refused")
            return out
        c = self.config
        # The orientation first: where the wrist lies, and so the reach, depends on it.
        if self.axis0 is None:
            self.anchor(current if current is not None else previous)
        q = self._cone(q, out)
        angle = quat_angle(previous.q, q)
        if angle > self.max_step_rad:
            q = quat_slerp(previous.q, q, self.max_step_rad / angle)
            self._count(out, "rotation_clamp")
        if current is not None:
            q = self._hold_turn(np.asarray(previous.q, float), q, np.asarray(current.q, float), out)
        goal = self._goal(p, q, out)
        # The only move: from the previous command toward the goal, never more than one step. Both
        # ends lie in the (convex) allowed region unless the previous command is outside it; then
        # this walks it back toward the region.
        step = _limit(goal - previous.p, self.max_step_m)
        if not np.allclose(step, goal - previous.p, rtol=0, atol=1e-12):
            self._count(out, "step_clamp" if c.contains(previous.p) else "return_to_box")
        if current is not None:
            step = self._hold_lead(previous.p, step, current.p, out)
        p = previous.p + step
        out.target = Pose(tuple(p), tuple(q))
        return out


class GripperHysteresis:
    """Turn a continuous closedness into open/close commands, issued only when the state changes."""

    def __init__(self, band: float) -> None:
        self.band = band
        self.closed: bool | None = None

    def update(self, closedness: float) -> bool | None:
        """The new state to command (True close, False open), or None when nothing changes."""
        if not np.isfinite(closedness):
            return None
        hi, lo = 0.5 + self.band / 2, 0.5 - self.band / 2
        if self.closed is None:
            want = closedness >= 0.5
        elif self.closed:
            want = not (closedness < lo)
        else:
            want = closedness > hi
        if want != self.closed:
            self.closed = want
            return want
        return None
