"""The safety layer between the plan and the arm: every target passes through `SafetyLayer.filter`.

What it guarantees for every commanded target, whatever the policy produced:
- finite numbers (a non-finite target is refused, never clamped into something plausible);
- inside the workspace box (positions are clamped onto the box);
- at most `max_step_m` of translation and `max_step_rad` of rotation away from the previous
  command (larger jumps are shortened along the same direction).
The box bounds commanded targets, not the arm's overshoot: franky's planner may carry the arm a
little past a target that reverses at speed, so keep a margin of a few centimetres between the box
and real obstacles (the sim tests measure the overshoot).
The dynamics factor (franky's velocity/acceleration/jerk scale) is part of this config because it
is a safety limit too; the arm driver receives it at connect time. The hardware emergency stop and
the controller's own reflexes stay in charge above all of this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from molmoact_edge.hardware.geometry import Pose, quat_angle, quat_slerp


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
        if not (0.0 <= self.gripper_hysteresis < 1.0):
            raise ValueError(f"SafetyConfig.gripper_hysteresis must be in [0, 1), got {self.gripper_hysteresis}")

    def contains(self, p: np.ndarray, tol: float = 1e-9) -> bool:
        return bool(np.all(p >= np.asarray(self.workspace_min) - tol) and np.all(p <= np.asarray(self.workspace_max) + tol))


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

    def _count(self, f: Filtered, what: str) -> None:
        f.interventions.append(what)
        self.counts[what] = self.counts.get(what, 0) + 1

    def filter(self, desired: Pose, previous: Pose, current: Pose | None = None) -> Filtered:
        """The target to command this step, given the desired one and the previous command."""
        out = Filtered(target=None)
        p, q = desired.p, desired.q
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(q))):
            self._count(out, "nonfinite_refused")
            return out
        lo, hi = np.asarray(self.config.workspace_min), np.asarray(self.config.workspace_max)
        clamped = np.clip(p, lo, hi)
        if not np.array_equal(clamped, p):
            self._count(out, "workspace_clamp")
            p = clamped
        step = p - previous.p
        n = float(np.linalg.norm(step))
        if n > self.max_step_m:
            # Both ends lie in the (convex) box, so the shortened step does too.
            p = previous.p + step * (self.max_step_m / n)
            self._count(out, "step_clamp")
        # A no-op unless `previous` lies outside the box (the measured pose right after start-up or a
        # stop, when the arm overshot): the box always wins over the step limit.
        p = np.clip(p, lo, hi)
        angle = quat_angle(previous.q, q)
        if angle > self.max_step_rad:
            q = quat_slerp(previous.q, q, self.max_step_rad / angle)
            self._count(out, "rotation_clamp")
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
