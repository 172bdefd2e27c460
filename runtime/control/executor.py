"""The executor: turn action chunks into a stream of safe absolute targets at a fixed rate.

Time model. A chunk's action k (0-based) is due at t0 + (k+1) * control_period, and between two
waypoints the executor interpolates, so that the arm receives a fresh target every executor tick
(20-50 Hz) while franky's 1 kHz loop smooths between them.
- If the robot was still executing a previous plan after the observation was taken, the world has
  moved on during inference: t0 is the observation time and waypoints already due when the chunk
  arrives are the *stale prefix*; they are dropped (the chained targets after them stay anchored
  at the observation pose, so the remaining absolute targets are still right). If every waypoint
  is stale, only the chunk's final target is kept.
- If the robot was holding still since before the observation (stop-and-go with slow inference),
  nothing went stale: t0 is the arrival time.

The executor is a pure function of the times it is given, so tests drive it with a fake clock; the
`Watchdog` is likewise a pure check of timestamps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from molmoact_edge.hardware.geometry import Pose, quat_slerp
from molmoact_edge.runtime.control.policy import ActionChunk
from molmoact_edge.runtime.control.safety import GripperHysteresis, SafetyLayer

_EPS_M = 1e-6
_EPS_RAD = 1e-6


@dataclass(frozen=True)
class Waypoint:
    due: float
    pose: Pose
    closedness: float
    index: int  # position in its chunk


@dataclass
class Accepted:
    ok: bool
    dropped: int = 0
    kept: int = 0
    t0: float = 0.0
    schedule: str = ""  # "observation" or "arrival"
    reason: str = ""


@dataclass
class Step:
    target: Pose | None = None  # the command to send this tick (None: nothing new)
    desired: Pose | None = None  # what the plan wanted before the safety layer
    gripper: bool | None = None  # True close / False open when the state changes
    interventions: list[str] = field(default_factory=list)
    waypoint: int | None = None
    refused: bool = False  # the safety layer refused the target (non-finite): stop


def _interp(a: Pose, b: Pose, alpha: float) -> Pose:
    alpha = min(1.0, max(0.0, alpha))
    return Pose(tuple(a.p + (b.p - a.p) * alpha), tuple(quat_slerp(a.q, b.q, alpha)))


class Executor:
    def __init__(self, safety: SafetyLayer, hysteresis: GripperHysteresis) -> None:
        self.safety = safety
        self.hysteresis = hysteresis
        self.plan: list[Waypoint] = []
        self._start: tuple[float, Pose] | None = None
        self.last_command: Pose | None = None
        self.plan_end: float | None = None
        self.chunks_accepted = 0

    # -- chunks
    def accept(self, chunk: ActionChunk, now: float, current: Pose) -> Accepted:
        if not chunk.finite:
            bad = int(np.sum(~np.isfinite(chunk.actions)))
            return Accepted(ok=False, reason=f"{bad} non-finite value(s) in the chunk for observation {chunk.observation_index}")
        conv = chunk.convention
        try:
            targets = conv.targets(chunk.anchor, chunk.actions)
        except ValueError as e:
            return Accepted(ok=False, reason=f"chunk does not compose into poses: {e}")
        moving_since_obs = self.plan_end is not None and self.plan_end > chunk.observation_time
        # From arrival, the accepting tick counts as the first tick of the first action.
        t0, schedule = (chunk.observation_time, "observation") if moving_since_obs else (now - self.safety.period_s, "arrival")
        period = conv.control_period_s
        wps = [
            Waypoint(t0 + (k + 1) * period, pose, conv.closedness(chunk.actions[k, 6]), k)
            for k, pose in enumerate(targets)
        ]
        fresh = [w for w in wps if w.due > now]
        dropped = len(wps) - len(fresh)
        if not fresh:
            last = wps[-1]
            fresh = [Waypoint(now + period, last.pose, last.closedness, last.index)]
        self.plan = fresh
        # The segment to the first waypoint starts one tick back, so that the tick accepting the chunk
        # already advances instead of re-sending the previous target (a gap in the stream).
        self._start = (now - self.safety.period_s, self.last_command if self.last_command is not None else current)
        self.plan_end = fresh[-1].due
        self.chunks_accepted += 1
        return Accepted(ok=True, dropped=dropped, kept=len(fresh), t0=t0, schedule=schedule)

    def clear(self) -> None:
        """Forget the plan and the last command (after a stop the arm is re-anchored at its pose)."""
        self.plan = []
        self._start = None
        self.last_command = None
        self.plan_end = None

    # -- ticks
    def desired_at(self, now: float) -> tuple[Pose | None, Waypoint | None]:
        if not self.plan or self._start is None:
            return None, None
        t_prev, p_prev = self._start
        for w in self.plan:
            if now < w.due:
                return _interp(p_prev, w.pose, (now - t_prev) / (w.due - t_prev)), w
            t_prev, p_prev = w.due, w.pose
        return self.plan[-1].pose, self.plan[-1]

    def step(self, now: float, current: Pose) -> Step:
        desired, wp = self.desired_at(now)
        out = Step(desired=desired, waypoint=None if wp is None else wp.index)
        if desired is None:
            return out
        previous = self.last_command if self.last_command is not None else current
        f = self.safety.filter(desired, previous, current)
        out.interventions = f.interventions
        if f.target is None:
            out.refused = True
            return out
        dm, dr = f.target.distance(previous)
        if self.last_command is None or dm > _EPS_M or dr > _EPS_RAD:
            out.target = f.target
            self.last_command = f.target
        out.gripper = self.hysteresis.update(wp.closedness)
        return out

    @property
    def idle(self) -> bool:
        """True when the plan is used up and the last command reached its final waypoint."""
        if not self.plan:
            return True
        if self.last_command is None:
            return False
        dm, dr = self.plan[-1].pose.distance(self.last_command)
        return dm <= _EPS_M and dr <= _EPS_RAD


@dataclass(frozen=True)
class Fault:
    kind: str  # camera_stall | policy_error | no_actions | arm_error | nonfinite_action | interrupted
    message: str
    occurred_at: float  # best estimate of when the fault became real
    detected_at: float


@dataclass(frozen=True)
class WatchdogConfig:
    frame_timeout_s: float = 0.5  # newest frame older than this: the camera stalled
    action_timeout_s: float = 60.0  # one inference longer than this: the policy hangs

    def __post_init__(self) -> None:
        if not (0.01 <= self.frame_timeout_s <= 10.0):
            raise ValueError(f"WatchdogConfig.frame_timeout_s must be in [0.01, 10] s, got {self.frame_timeout_s}")
        if not (0.05 <= self.action_timeout_s <= 600.0):
            raise ValueError(f"WatchdogConfig.action_timeout_s must be in [0.05, 600] s, got {self.action_timeout_s}")


class Watchdog:
    def __init__(self, config: WatchdogConfig) -> None:
        self.config = config

    def next_deadline(self, newest_frame_time: float | None, started_at: float,
                      worker_busy_since: float | None) -> float:
        """When a time-based fault would become real if nothing new arrives before then."""
        reference = newest_frame_time if newest_frame_time is not None else started_at
        t = reference + self.config.frame_timeout_s
        if worker_busy_since is not None:
            t = min(t, worker_busy_since + self.config.action_timeout_s)
        return t

    def check(
        self,
        now: float,
        newest_frame_time: float | None,
        started_at: float,
        worker_busy_since: float | None,
        worker_error: str | None,
        worker_error_at: float | None,
        arm_error: str | None,
    ) -> Fault | None:
        c = self.config
        if arm_error is not None:
            return Fault("arm_error", f"arm: {arm_error}", now, now)
        if worker_error is not None:
            first = worker_error.strip().splitlines()
            return Fault("policy_error", f"inference worker failed: {first[-1] if first else worker_error}",
                         worker_error_at if worker_error_at is not None else now, now)
        reference = newest_frame_time if newest_frame_time is not None else started_at
        if now - reference > c.frame_timeout_s:
            what = "no frame at all" if newest_frame_time is None else f"newest frame is {1000 * (now - reference):.0f} ms old"
            return Fault("camera_stall", f"camera stalled: {what} (limit {1000 * c.frame_timeout_s:.0f} ms); "
                         "check the camera cable/USB bandwidth or the replay source", reference + c.frame_timeout_s, now)
        if worker_busy_since is not None and now - worker_busy_since > c.action_timeout_s:
            return Fault("no_actions", f"no action chunk: inference has run {now - worker_busy_since:.1f} s "
                         f"(limit {c.action_timeout_s:.1f} s); the policy is hung or far too slow for this machine",
                         worker_busy_since + c.action_timeout_s, now)
        return None
