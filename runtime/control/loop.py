"""The control loop: cameras -> inference worker -> executor -> safety -> arm, at a fixed rate.

One thread (the caller's) runs the ticks; cameras capture in their own threads and the policy runs
in an `InferenceWorker`. Every tick, in this order: read the arm state and the newest frames (never
blocking), collect a finished chunk, run the watchdog, submit a new observation when due, step the
executor and send its target. Any fault stops the arm in the same tick and ends the run; the arm is
stopped and the worker joined on every exit path, Ctrl-C and SIGTERM included (the CLI turns
SIGTERM into the same KeyboardInterrupt). Every stop goes through `_stop`; a stop that ends the
run sets `halted`, after which nothing is sent to the arm.
"""

from __future__ import annotations

import logging
import sys
import threading
from bisect import bisect_left
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import IO, Callable, Sequence

from molmoact_edge.hardware.arm import Arm, ArmError
from molmoact_edge.hardware.camera import Camera
from molmoact_edge.hardware.geometry import Pose
from molmoact_edge.runtime.control.clock import MonotonicClock
from molmoact_edge.runtime.control.executor import (
    Executor,
    Fault,
    Watchdog,
    WatchdogConfig,
)
from molmoact_edge.runtime.control.policy import Observation, PolicySpec
from molmoact_edge.runtime.control.runlog import RunLog, Status
from molmoact_edge.runtime.control.safety import (
    GripperHysteresis,
    SafetyConfig,
    SafetyLayer,
)
from molmoact_edge.runtime.control.worker import InferenceWorker, WorkerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    instruction: str = ""
    rate_hz: float = 50.0
    safety: SafetyConfig = SafetyConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    worker: WorkerConfig = WorkerConfig()
    # Ask for the next chunk when the current plan has this little time left (seconds); a policy
    # slower than its chunk should set it to its latency or more so that inference overlaps motion.
    replan_when_remaining_s: float = 0.3
    log_path: str | None = None
    status_interval_s: float = 1.0
    max_duration_s: float | None = None

    def __post_init__(self) -> None:
        if not (20.0 <= self.rate_hz <= 50.0):
            raise ValueError(f"LoopConfig.rate_hz must be in [20, 50] Hz (franky interpolates at 1 kHz), got {self.rate_hz}")
        if self.replan_when_remaining_s < 0:
            raise ValueError(f"LoopConfig.replan_when_remaining_s must be >= 0, got {self.replan_when_remaining_s}")
        if self.max_duration_s is not None and self.max_duration_s <= 0:
            raise ValueError(f"LoopConfig.max_duration_s must be positive, got {self.max_duration_s}")


@dataclass
class RunResult:
    reason: str  # "duration" | "until" | "stopped" | "fault" | "interrupted"
    fault: Fault | None = None
    ticks: int = 0
    commands: int = 0
    chunks: int = 0
    stop_latency_s: float | None = None  # fault occurrence -> stop sent
    interventions: dict = field(default_factory=dict)
    planner_recoveries: int = 0  # franky planner failures the arm recovered from (FrankyConfig.planner_retries)

    @property
    def exit_code(self) -> int:
        return {"fault": 2, "interrupted": 130}.get(self.reason, 0)


class PoseHistory:
    """Recent (host time, pose) samples, to anchor a chunk at the pose when its frame was taken."""

    def __init__(self, seconds: float = 3.0) -> None:
        self.seconds = seconds
        self._t: deque[float] = deque()
        self._p: deque[Pose] = deque()

    def add(self, t: float, pose: Pose) -> None:
        if self._t and t <= self._t[-1]:
            return
        self._t.append(t)
        self._p.append(pose)
        while self._t and self._t[0] < t - self.seconds:
            self._t.popleft()
            self._p.popleft()

    def at(self, t: float) -> Pose | None:
        if not self._t:
            return None
        i = bisect_left(self._t, t)
        if i == 0:
            return self._p[0]
        if i >= len(self._t):
            return self._p[-1]
        return self._p[i] if self._t[i] - t < t - self._t[i - 1] else self._p[i - 1]


class ControlLoop:
    def __init__(self, cameras: Sequence[Camera], arm: Arm, policy: PolicySpec, config: LoopConfig,
                 clock=None, status_stream: IO[str] | None = sys.stderr) -> None:
        if not cameras:
            raise ValueError("ControlLoop needs at least one camera")
        self.cameras = list(cameras)
        self.arm = arm
        self.config = config
        self.clock = clock or MonotonicClock()
        self.period = 1.0 / config.rate_hz
        self.safety = SafetyLayer(config.safety, self.period)
        self.executor = Executor(self.safety, GripperHysteresis(config.safety.gripper_hysteresis))
        self.watchdog = Watchdog(config.watchdog)
        self.worker = InferenceWorker(policy, config.worker, clock=self.clock.now)
        self.poses = PoseHistory()
        self.runlog = RunLog(config.log_path)
        self.status = Status(status_stream, config.status_interval_s)
        self.stop_event = threading.Event()
        self._obs_index = 0
        self.tick_starts: list[float] = []  # for benchmarks/executor_jitter.py (capped)
        self._last_submitted_frame: float | None = None
        self.halted = False  # a final stop was sent: the arm gets no further command

    # -- lifecycle
    def __enter__(self) -> ControlLoop:
        self.worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        # Each step even when the one before raised (a Ctrl-C or SIGTERM landing in the middle of it).
        self.halted = True
        try:
            self.arm.stop()
        finally:
            try:
                self.worker.close()
            finally:
                self.runlog.close()

    # -- the loop
    def run(self, until: Callable[[], bool] | None = None) -> RunResult:
        clock, c = self.clock, self.config
        start = clock.now()
        self.runlog.write("start", start, rate_hz=c.rate_hz, instruction=c.instruction, arm=self.arm.name,
                          cameras=[cam.name for cam in self.cameras], safety=asdict(c.safety),
                          worker=c.worker.mode)
        result = RunResult(reason="stopped")
        start_pose = self.arm.state().pose
        self.safety.anchor(start_pose)  # the orientation cone is centred on the start pose
        self.runlog.write("anchor", start, pose=start_pose.to_dict())
        next_tick = start
        try:
            while True:
                now = clock.now()
                if len(self.tick_starts) < 100_000:
                    self.tick_starts.append(now)
                fault = self._tick(now, start, result)
                if fault is not None:
                    self._stop(fault, result, final=True)
                    break
                result.ticks += 1
                if self.stop_event.is_set():
                    result.reason = "stopped"
                    break
                if until is not None and until():
                    result.reason = "until"
                    break
                if c.max_duration_s is not None and now - start >= c.max_duration_s:
                    result.reason = "duration"
                    break
                next_tick += self.period
                behind = clock.now() - next_tick
                if behind > 0:
                    # Overrun: skip the missed ticks instead of bursting to catch up.
                    missed = int(behind // self.period) + 1
                    self.status.overruns += 1
                    self.runlog.write("overrun", clock.now(), late_s=behind, skipped=missed - 1)
                    next_tick += missed * self.period
                fault = self._wait_until(next_tick, start)
                if fault is not None:
                    self._stop(fault, result, final=True)
                    break
        except KeyboardInterrupt as e:
            now = clock.now()
            why = str(e) or "the user (Ctrl-C)"  # the CLI's SIGTERM handler names itself
            self._stop(Fault("interrupted", f"interrupted by {why}", now, now), result, final=True)
        except BaseException as e:
            now = clock.now()
            self._stop(Fault("internal_error", f"control loop error: {type(e).__name__}: {e}", now, now), result,
                       final=True)
            raise
        finally:
            if not self.halted:  # ended without a fault (duration, until, stop_event)
                self.arm.stop()
                self.halted = True
            result.commands = self.status.commands
            result.chunks = self.status.chunks
            result.interventions = dict(self.status.interventions)
            recovered = list(getattr(self.arm, "planner_recoveries", []))
            result.planner_recoveries = len(recovered)
            self.runlog.write("end", clock.now(), reason=result.reason, ticks=result.ticks, commands=result.commands,
                              chunks=result.chunks, interventions=result.interventions,
                              planner_recoveries=[{"t": t, "error": m} for t, m in recovered],
                              fault=None if result.fault is None else result.fault.kind)
        return result

    def _stop(self, fault: Fault, result: RunResult | None, final: bool) -> None:
        """The one stop path: stop the arm, forget the plan, log it. `final` ends the run (nothing is
        sent afterwards); otherwise the arm holds and the next chunk starts from its measured pose."""
        if final:
            self.halted = True  # before the stop: no command may slip in after it
        confirmed = self.arm.stop()
        sent = self.clock.now()
        self.executor.clear()
        if result is not None:
            result.reason = "interrupted" if fault.kind == "interrupted" else "fault"
            result.fault = fault
            result.stop_latency_s = sent - fault.occurred_at
        log.error("STOP (%s): %s%s", fault.kind, fault.message,
                  "" if final else "; arm holds, waiting for the next chunk")
        self.runlog.write("stop", sent, fault=fault.kind, message=fault.message, occurred_at=fault.occurred_at,
                          detected_at=fault.detected_at, latency_s=sent - fault.occurred_at, sent=confirmed)

    def _camera_error(self, now: float) -> Fault | None:
        """A capture thread that died reports it at once; waiting for its frames to age out would
        cost the whole frame timeout."""
        for cam in self.cameras:
            err = getattr(cam, "error", None)
            if err is not None:
                return Fault("camera_error", f"camera {cam.name} failed: {type(err).__name__}: {err}", now, now)
        return None

    def _frames_time(self) -> float | None:
        frames = [cam.latest() for cam in self.cameras]
        return min(f.timestamp for f in frames) if all(f is not None for f in frames) else None

    def _wait_until(self, deadline: float, start: float) -> Fault | None:
        """Sleep until the next tick, but handle inference news (a chunk, an error, a dead worker)
        the moment it arrives, and wake when a stale frame or a hung inference is due, so that a
        fault stops the arm without waiting for the next tick."""
        clock = self.clock
        while True:
            now = clock.now()
            due = self.watchdog.next_deadline(self._frames_time(), start, self.worker.busy_since)
            if due <= now:
                fault = self.watchdog.check(now, self._frames_time(), start, self.worker.busy_since,
                                            None, None, None)
                if fault is not None:
                    return fault
            remaining = deadline - now
            if remaining <= 0.002:
                clock.sleep_until(deadline)
                return None
            wait = remaining - 0.0015
            if now < due < now + wait:
                wait = due - now + 0.0002
            if self.worker.news.wait(wait):
                self.worker.news.clear()
                now = clock.now()
                err = self.worker.error
                if err is not None:
                    return self.watchdog.check(now, now, now, None, err, self.worker.error_at, None)
                chunk = self.worker.poll()
                if chunk is not None:
                    self._handle_chunk(chunk, now, self.arm.state().pose)

    def _handle_chunk(self, chunk, now: float, pose: Pose) -> None:
        self.status.chunks += 1
        self.status.latency_s = chunk.finished_at - chunk.observation_time
        acc = self.executor.accept(chunk, now, pose)
        self.runlog.write("chunk", now, observation=chunk.observation_index, observation_time=chunk.observation_time,
                          finished_at=chunk.finished_at, actions=chunk.actions, accepted=acc.ok,
                          dropped=acc.dropped, kept=acc.kept, schedule=acc.schedule, reason=acc.reason,
                          info=chunk.info)
        if not acc.ok:
            # A broken chunk is refused whole and the arm holds still; the next chunk may be fine.
            self.status.intervene("nonfinite_action")
            self._stop(Fault("nonfinite_action", acc.reason, chunk.finished_at, now), None, final=False)
        else:
            self.status.last_action = [float(v) for v in chunk.actions[0]]
            if acc.dropped:
                self.status.intervene("stale_prefix_dropped")

    def _tick(self, now: float, start: float, result: RunResult) -> Fault | None:
        c = self.config
        self.status.tick(now)
        state = self.arm.state()
        poll = getattr(self.arm, "poll", None)
        if poll is not None:
            poll()
            state = self.arm.state()
        self.poses.add(state.host_time, state.pose)
        frames = [cam.latest() for cam in self.cameras]
        complete = all(f is not None for f in frames)
        oldest = min(f.timestamp for f in frames) if complete else None
        chunk = self.worker.poll()
        err = self.worker.error
        fault = self.watchdog.check(now, oldest, start, self.worker.busy_since, err, self.worker.error_at, state.error)
        if fault is not None:
            return fault
        fault = self._camera_error(now)
        if fault is not None:
            return fault
        outside = self.safety.check_measured(state.pose)
        if outside is not None:
            return Fault("workspace_exit", outside, now, now)

        if chunk is not None:
            self._handle_chunk(chunk, now, state.pose)

        if complete and not self.worker.busy and oldest != self._last_submitted_frame:
            remaining = None if self.executor.plan_end is None else self.executor.plan_end - now
            if remaining is None or remaining <= c.replan_when_remaining_s:
                anchor = self.poses.at(oldest) or state.pose
                obs = Observation(frames=tuple(frames), instruction=c.instruction, timestamp=oldest,
                                  pose=anchor, index=self._obs_index)
                if self.worker.submit(obs):
                    self.runlog.write("observation", now, index=self._obs_index, timestamp=oldest,
                                      frames=[[f.camera, f.index, f.timestamp] for f in frames], pose=anchor.to_dict())
                    self._obs_index += 1
                    self._last_submitted_frame = oldest

        step = self.executor.step(now, state.pose)
        for what in step.interventions:
            self.status.intervene(what)
        if step.refused:
            return Fault("nonfinite_action", "the safety layer refused a non-finite target", now, now)
        if step.target is not None and not self.halted:
            try:
                self.arm.move_to(step.target)
            except ArmError as e:
                return Fault("arm_error", str(e), now, now)
            self.status.commands += 1
            self.runlog.write("command", now, tick=result.ticks, target=step.target.to_dict(), desired=step.desired.to_dict(),
                              waypoint=step.waypoint, interventions=step.interventions, pose=state.pose.to_dict())
        if step.gripper is not None:
            self.arm.set_gripper(step.gripper)
            self.runlog.write("gripper", now, closed=step.gripper)
        self.status.maybe_print(now, state.pose)
        return None
