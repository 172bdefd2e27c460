"""A Franka arm through franky (`pip install molmoact-edge[robot]`), real or franky-sim.

Four things libfranka does not do for a streaming controller, done here:
- a TCP probe of the FCI port with a deadline before connecting, because libfranka blocks for about
  a minute on an unreachable host before it fails;
- a state monitor thread: `Robot.state` blocks for up to 1 s when the connection is gone (it waits
  for the next UDP packet), and during a motion it silently returns the last state forever. The
  monitor reads in the background (franky releases the GIL) and marks the arm stale when the
  controller's clock stops advancing, so `state()` never blocks the control loop;
- a command thread: move/stop/poll calls happen there, never in the control thread, because any
  franky call waits on the robot lock that a blocked state read holds;
- errors remembered and reported through `state().error` instead of surfacing on a later call;
- a bounded `close()`: libfranka can block without end once the link is gone (the `Robot`
  destructor waiting for a Move reply that never comes; seen once in the sim tests, >8 min). A
  robot or gripper object that was not left clean (link lost, error, stop unconfirmed, its thread
  still busy) is therefore never destroyed: it is leaked on purpose until the process exits, when
  the operating system closes its sockets. `close()` returns within `close_timeout_s`.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .arm import ArmError, ArmState
from .deps import require
from .geometry import Pose

log = logging.getLogger(__name__)

FCI_PORT = 1337  # libfranka's command port; the gripper uses 1338

UNREACHABLE_FIX = (
    "Check that the robot is powered and unlocked, FCI is activated in Desk, the network path works "
    "(`ping {host}`; the workstation must be on the robot's subnet), and no other process is "
    "connected to it. For the simulator run `python -m molmoact_edge.hardware.sim_launch --simulator mujoco` (it "
    "prints the address; plain `franky-sim` lets franky run away, see README) "
    "or use --robot sim."
)


def franky_module():
    return require("franky", "franky-control")


_ABANDONED: list = []  # franky objects whose destructor may block forever (see close())


def _abandon(obj) -> None:
    """Keep `obj` alive until the process ends: one extra reference that nothing ever drops, so
    its destructor runs neither now nor when the interpreter clears its modules at exit."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
    _ABANDONED.append(obj)


def _joined(thread: threading.Thread, deadline: float) -> bool:
    thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return not thread.is_alive()


def probe(host: str, port: int = FCI_PORT, timeout_s: float = 2.0) -> None:
    """Raise ArmError naming the fix unless `host:port` accepts a TCP connection within the deadline."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except socket.timeout:
        raise ArmError(
            f"Franka at {host}:{port} did not answer within {timeout_s:.1f} s (no route or host down). "
            + UNREACHABLE_FIX.format(host=host)
        ) from None
    except OSError as e:
        raise ArmError(f"Franka at {host}:{port} is unreachable: {e}. " + UNREACHABLE_FIX.format(host=host)) from None


@dataclass(frozen=True)
class FrankyConfig:
    host: str
    dynamics_factor: float = 0.1  # franky's relative velocity/acceleration/jerk scale
    connect_timeout_s: float = 3.0
    state_timeout_s: float = 0.1  # controller clock frozen this long => connection lost
    gripper: bool = True
    gripper_speed: float = 0.05  # m/s
    gripper_force: float = 20.0  # N
    gripper_open_width: float = 0.08  # m
    realtime: bool = False  # True on an RT kernel: libfranka then enforces real-time scheduling
    monitor_period_s: float = 0.005  # 200 Hz: plenty for a 100 ms staleness limit, light on the GIL
    # close() returns within this, whatever libfranka does: 1 s for the stop to be confirmed, the
    # rest for the threads (a state read on a dead link blocks about 1 s; a grasp may run longer).
    close_timeout_s: float = 3.0
    # A real controller's clock runs at 1 s per s; franky-sim's counts simulated 1 ms steps and falls
    # behind on a machine too busy to simulate in real time. Below this rate the run says so.
    min_clock_rate: float = 0.8
    clock_window_s: float = 1.0
    # franky's planner (Ruckig 0.17) sometimes fails to plan a replaced motion from a valid state:
    # error -110 or -111 ("execution time" / "synchronization calculation"), a known numerical
    # failure (pantor/ruckig#129, franky#76 on a real FR3). franky then ends the motion and the arm
    # stops. Up to this many such failures within `planner_retry_window_s` are recovered from: the
    # arm settles for `planner_settle_s`, controller errors are cleared, and the next target starts
    # a new motion from rest. One more is a fault. 0 makes the first one a fault.
    planner_retries: int = 3
    planner_retry_window_s: float = 60.0
    planner_settle_s: float = 0.2
    # close() stops the arm and ends the threads; then franky's objects are destroyed, and their
    # destructors can block inside libfranka (a SIGTERM test under load hung more than 15 s in a
    # clean close). A process that ends right after (the CLI's `run`) sets this: the objects are left
    # to the end of the process, when the OS closes their connections, and close() cannot hang there.
    release_at_exit: bool = False

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("FrankyConfig.host must be the robot's FCI address, e.g. 172.16.0.2")
        if not (0.0 < self.dynamics_factor <= 1.0):
            raise ValueError(f"FrankyConfig.dynamics_factor must be in (0, 1], got {self.dynamics_factor}")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"FrankyConfig.connect_timeout_s must be positive, got {self.connect_timeout_s}")
        if not (0.005 <= self.state_timeout_s <= 5.0):
            raise ValueError(f"FrankyConfig.state_timeout_s must be in [0.005, 5] s, got {self.state_timeout_s}")
        if not (1.5 <= self.close_timeout_s <= 30.0):
            raise ValueError(f"FrankyConfig.close_timeout_s must be in [1.5, 30] s, got {self.close_timeout_s}")
        if not (0.0 < self.min_clock_rate <= 1.0) or self.clock_window_s <= 0:
            raise ValueError(f"FrankyConfig.min_clock_rate must be in (0, 1] and clock_window_s positive, got "
                             f"{self.min_clock_rate}, {self.clock_window_s}")
        if not (0 <= self.planner_retries <= 100) or self.planner_retry_window_s <= 0 or not (0 <= self.planner_settle_s <= 5):
            raise ValueError(f"FrankyConfig.planner_retries must be in [0, 100] (got {self.planner_retries}), "
                             f"planner_retry_window_s positive and planner_settle_s in [0, 5] s")
        if not (0.0 < self.gripper_open_width <= 0.08):
            raise ValueError(f"FrankyConfig.gripper_open_width must be in (0, 0.08] m, got {self.gripper_open_width}")


class FrankyArm:
    def __init__(self, config: FrankyConfig, clock=time.monotonic) -> None:
        self.config = config
        self.name = f"franka:{config.host}"
        self._clock = clock
        self._robot = None
        self._gripper = None
        self._lock = threading.Lock()
        self._state: ArmState | None = None
        self._error: str | None = None
        self._last_robot_time: float | None = None
        self._last_advance: float = 0.0
        self._monitor: threading.Thread | None = None
        self._stop_monitor = threading.Event()
        self._stopping = False
        self._preempt_expected_until = 0.0  # our own stop's preemption may surface until then
        self._gripper_width: float | None = None
        self._gripper_wanted: bool | None = None
        self._gripper_thread: threading.Thread | None = None
        self._ops: deque = deque()
        self._ops_lock = threading.Lock()
        self._ops_event = threading.Event()
        self._stop_commands = threading.Event()
        self._commander: threading.Thread | None = None
        self._inflight = 0  # ops taken off the queue and not yet carried out
        self.last_stop_sent_at: float | None = None
        self.stops_sent = 0  # stops carried out by the command thread (tests audit this)
        self.speed_limits: tuple[float, float] | None = None  # (m/s, rad/s) franky may follow; set at connect
        self.slowest_clock_rate: float | None = None  # controller seconds per host second, worst window
        self.planner_recoveries: list[tuple[float, str]] = []  # (host time, franky's message) of each
        self._resume_at = 0.0  # targets are held back until then after a recovered planner failure
        self._clock_window: tuple[float, float] | None = None

    # -- lifecycle
    def connect(self) -> FrankyArm:
        if self._robot is not None:
            return self
        franky = franky_module()
        c = self.config
        probe(c.host, FCI_PORT, c.connect_timeout_s)
        box: dict = {}

        def construct() -> None:
            try:
                rt = franky.RealtimeConfig.Enforce if c.realtime else franky.RealtimeConfig.Ignore
                box["robot"] = franky.Robot(c.host, realtime_config=rt)
            except Exception as e:  # reported to the caller below
                box["error"] = e

        # The probe passed, but libfranka's handshake can still hang (wrong firmware, a second
        # client); a daemon thread bounds it with the same deadline.
        t = threading.Thread(target=construct, name="franky-connect", daemon=True)
        t.start()
        t.join(c.connect_timeout_s + 2.0)
        if t.is_alive():
            raise ArmError(f"libfranka did not finish connecting to {c.host} within {c.connect_timeout_s + 2:.0f} s. "
                           + UNREACHABLE_FIX.format(host=c.host))
        if "error" in box:
            e = box["error"]
            raise ArmError(f"libfranka refused the connection to {c.host}: {type(e).__name__}: {e}. "
                           "A version mismatch means franky-control does not match the robot's system "
                           "version; otherwise " + UNREACHABLE_FIX.format(host=c.host)) from e
        robot = box["robot"]
        robot.relative_dynamics_factor = c.dynamics_factor
        # franky's Cartesian planner bounds each axis of the translation and of the rotation vector by
        # these limits times the dynamics factor: the fastest a streamed target can be followed.
        self.speed_limits = (float(robot.translation_velocity_limit.get()) * c.dynamics_factor,
                             float(robot.rotation_velocity_limit.get()) * c.dynamics_factor)
        if robot.has_errors:
            log.warning("%s: robot reports errors at connect; running automatic recovery", self.name)
            robot.recover_from_errors()
        self._robot = robot
        if c.gripper:
            try:
                self._gripper = franky.Gripper(c.host)
            except Exception as e:
                self.close()
                raise ArmError(f"gripper at {c.host}:1338 is unreachable: {e}. Enable the Franka Hand in Desk or "
                               "pass gripper=False (CLI: --no-gripper).") from e
        self._read_state()  # fail now rather than in the first control tick
        self._stop_monitor.clear()
        self._monitor = threading.Thread(target=self._monitor_loop, name="franky-state", daemon=True)
        self._monitor.start()
        if self._gripper is not None:
            self._gripper_thread = threading.Thread(target=self._gripper_loop, name="franky-gripper", daemon=True)
            self._gripper_thread.start()
        self._stop_commands.clear()
        self._commander = threading.Thread(target=self._command_loop, name="franky-commands", daemon=True)
        self._commander.start()
        return self

    def close(self) -> None:
        """Stop, end the threads and release franky, within `close_timeout_s` whatever libfranka does."""
        deadline = time.monotonic() + self.config.close_timeout_s
        link_ok = self._robot is None or not self._link_lost  # judged before the monitor stops
        confirmed = self.stop(wait_s=1.0) if self._robot is not None else True
        self._stop_commands.set()
        self._stop_monitor.set()
        # One shared deadline for the three threads (a read on a dead link blocks about 1 s, a grasp
        # in progress finishes first).
        busy = [t for t in (self._commander, self._monitor, self._gripper_thread)
                if t is not None and not _joined(t, deadline)]
        self._commander = self._monitor = self._gripper_thread = None
        clean = link_ok and confirmed and not busy and self._error is None
        if clean and self._robot is not None and not self._motion_ended(deadline):
            clean = False
            log.warning("%s: franky's motion thread did not end within %.1f s (libfranka still waiting on the "
                        "controller); its objects are left to the end of the process", self.name,
                        self.config.close_timeout_s)
        robot, gripper, self._robot, self._gripper = self._robot, self._gripper, None, None
        for obj in (robot, gripper):
            if obj is not None and (not clean or self.config.release_at_exit):
                _abandon(obj)
        if busy:
            log.warning("%s: %s still inside libfranka after %.1f s; left behind (daemon)", self.name,
                        ", ".join(t.name for t in busy), self.config.close_timeout_s)
        del robot, gripper  # clean: franky closes the connection now

    def _motion_ended(self, deadline: float) -> bool:
        """Whether franky's motion thread has ended, waiting (without the GIL) until `deadline`.

        franky's destructor joins that thread while holding the GIL, with no timeout. We saw it wait
        forever: after a stop and a new target in quick succession, libfranka sat in startMotion
        waiting for franky-sim to confirm a motion it never confirmed, and the whole process froze."""
        try:
            return bool(self._robot.join_motion(timeout=max(0.05, deadline - time.monotonic())))
        except Exception:  # the motion ended with an error (already reported, or ours: the stop)
            return True

    def __enter__(self) -> FrankyArm:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state
    def _read_state(self) -> None:
        st = self._robot.state
        now = self._clock()
        robot_t = st.time.to_sec()
        if self._last_robot_time is None or robot_t != self._last_robot_time:
            self._last_robot_time = robot_t
            self._last_advance = now
        self._track_clock_rate(now, robot_t)
        if self._error is None:
            runaway = self._runaway(np.asarray(st.O_dP_EE_c.linear, float), np.asarray(st.O_dP_EE_c.angular, float))
            if runaway:
                self._set_error(runaway)
        ee = st.O_T_EE
        pose = Pose(tuple(np.asarray(ee.translation, float)), tuple(np.asarray(ee.quaternion, float)))
        # Errors and gripper width are read here, never in state(): each is a network round trip.
        if self._robot.has_errors and self._error is None:
            self._set_error("the robot reports an error (reflex or safety stop); see Desk, then recover()")
        with self._lock:
            self._state = ArmState(pose=pose, host_time=now, robot_time_s=robot_t, error=self._error,
                                   gripper_width=self._gripper_width)

    def _monitor_loop(self) -> None:
        while not self._stop_monitor.is_set():
            try:
                self._read_state()
            except Exception as e:
                self._set_error(f"reading the robot state failed: {type(e).__name__}: {e}")
                self._stop_monitor.wait(0.05)
            self._stop_monitor.wait(self.config.monitor_period_s)

    def _runaway(self, linear: np.ndarray, angular: np.ndarray) -> str | None:
        """Why the commanded twist cannot have come from franky's planner, or None.

        The planner keeps each axis within `speed_limits`, so the norm stays within sqrt(3) of it. Twice
        that means the command is running away (measured on a franky-sim starved of CPU: franky
        extrapolating missed cycles reached 20 rad/s). A real Franka stops such a command with a velocity
        reflex; franky-sim has no reflexes and follows it, out of the workspace."""
        if self.speed_limits is None:
            return None
        v, w = float(np.linalg.norm(linear)), float(np.linalg.norm(angular))
        v_max, w_max = (2.0 * np.sqrt(3.0) * lim for lim in self.speed_limits)
        if v <= v_max and w <= w_max:
            return None
        return (f"the commanded end-effector twist ({v:.2f} m/s, {w:.2f} rad/s) exceeds twice what franky's planner "
                f"may command at dynamics {self.config.dynamics_factor} ({v_max:.2f} m/s, {w_max:.2f} rad/s): the "
                "motion is running away; stopped as a Franka's velocity reflex would")

    def _track_clock_rate(self, now: float, robot_t: float) -> None:
        if self._clock_window is None or robot_t < self._clock_window[1]:
            self._clock_window = (now, robot_t)
            return
        h0, r0 = self._clock_window
        if now - h0 < self.config.clock_window_s:
            return
        rate = (robot_t - r0) / (now - h0)
        self._clock_window = (now, robot_t)
        if rate == 0.0:
            return  # a frozen clock is the lost-connection case, reported by state()
        first_slow = rate < self.config.min_clock_rate and not self._clock_note()
        if self.slowest_clock_rate is None or rate < self.slowest_clock_rate:
            self.slowest_clock_rate = rate
        if first_slow:
            log.warning("%s: %s", self.name, self._clock_note())

    def _clock_note(self) -> str:
        r = self.slowest_clock_rate
        if r is None or r >= self.config.min_clock_rate:
            return ""
        # Measured on franky-sim: libfranka then misses 1 kHz states, franky extrapolates the missed
        # cycles and seeds every replaced motion from the simulator's lagging velocity estimate, its
        # planner aborts or its command runs away, and the simulated arm (no reflexes) follows.
        return (f"the controller clock ran at {r:.2f}x real time (below {self.config.min_clock_rate:.2f}): the "
                "simulator cannot keep up on this machine, so franky's 1 kHz loop misses states and its planner "
                "misbehaves; run it on a machine with a free CPU core (a real Franka's clock never lags)")

    def _set_error(self, message: str) -> None:
        note = self._clock_note()
        if note and note not in message:
            message = f"{message} [{note}]"
        if self._error is None:
            log.error("%s: %s", self.name, message)
        self._error = message

    def _stale_for(self) -> float:
        return self._clock() - self._last_advance

    def state(self) -> ArmState:
        with self._lock:
            s = self._state
        if s is None:
            raise ArmError(f"{self.name} is not connected: call connect() or use it in a `with` block")
        stale = self._stale_for()
        error = self._error
        if error is None and stale > self.config.state_timeout_s:
            error = (f"no new robot state from {self.config.host} for {stale * 1000:.0f} ms: the connection "
                     "is lost or the controller stopped (check the network, Desk, or whether franky-sim is still running)")
            note = self._clock_note()
            error += f" [{note}]" if note else ""
        return ArmState(s.pose, s.host_time, s.robot_time_s, error, s.gripper_width)

    @property
    def _link_lost(self) -> bool:
        # While the link is down the monitor thread sits in a 1 s blocking read holding franky's robot
        # lock, and any other franky call would wait for it: never make one from the control thread then.
        return self._stale_for() > self.config.state_timeout_s

    # -- commands
    # The control thread never calls franky: while the link is failing, the monitor's read holds
    # franky's robot lock for up to 1 s and any call would wait for it. Commands go through a small
    # queue to the command thread instead: the newest target replaces an unsent one, stops keep
    # their place in line.
    def move_to(self, target: Pose) -> None:
        if self._robot is None:
            raise ArmError(f"{self.name} is not connected")
        if self._error is not None:
            raise ArmError(f"{self.name} refuses motion while in error: {self._error}")
        if self._link_lost:
            raise ArmError(f"{self.name}: no robot state for {self._stale_for() * 1000:.0f} ms; motion refused")
        with self._ops_lock:
            # Only an unsent target may be replaced; a queued stop keeps its place and is sent first.
            if self._ops and isinstance(self._ops[-1], Pose):
                self._ops[-1] = target
            else:
                self._ops.append(target)
        self._ops_event.set()

    def poll(self) -> None:
        """Kept for the Arm interface: the command thread polls the running motion itself."""

    @property
    def pending_ops(self) -> int:
        """Targets and stops queued or being carried out by the command thread."""
        with self._ops_lock:
            return len(self._ops) + self._inflight

    def stop(self, wait_s: float = 0.05) -> bool:
        """Queue a stop ahead of any later target; wait up to `wait_s` for it to be sent.

        Returns True when the stop reached franky. Never raises."""
        if self._robot is None:
            return False
        if self._link_lost:
            self._send_stop()  # records why nothing could be sent; makes no franky call
            return False
        sent = threading.Event()
        with self._ops_lock:
            self._ops = deque(op for op in self._ops if not isinstance(op, Pose))  # drop unsent targets
            self._ops.append(("stop", sent))
        self._ops_event.set()
        return sent.wait(wait_s)

    def _command_loop(self) -> None:
        franky = franky_module()
        while not self._stop_commands.is_set():
            self._ops_event.wait(0.01)
            self._ops_event.clear()
            while True:
                with self._ops_lock:
                    op = self._ops.popleft() if self._ops else None
                    self._inflight = 1 if op is not None else 0
                if op is None:
                    break
                try:
                    self._carry_out(franky, op)
                finally:
                    with self._ops_lock:
                        self._inflight = 0
            if not self._link_lost and not self._stopping:
                try:
                    self._robot.poll_motion()
                except Exception as e:
                    if not self._own_preemption(e) and not self._recovered_planner_failure(e):
                        self._set_error(f"motion aborted: {type(e).__name__}: {e}")

    def _carry_out(self, franky, op) -> None:
        if isinstance(op, Pose):
            if self._link_lost or self._error is not None or self._clock() < self._resume_at:
                return
            affine = franky.Affine(np.asarray(op.position), np.asarray(op.quaternion))
            for attempt in (0, 1):
                try:
                    self._robot.move(franky.CartesianMotion(affine), asynchronous=True)
                    self._stopping = False
                    return
                except Exception as e:
                    # The preemption our own stop provoked can surface on the next move: retry once.
                    if attempt == 0 and self._own_preemption(e):
                        continue
                    if not self._recovered_planner_failure(e):
                        self._set_error(f"move rejected: {type(e).__name__}: {e}")
                    return
        else:
            self._send_stop()
            self.last_stop_sent_at = self._clock()
            self.stops_sent += 1
            op[1].set()

    def _recovered_planner_failure(self, e: Exception) -> bool:
        """True when `e` is one of Ruckig's numerical failures (-110, -111) within the retry budget:
        the motion has ended, so the arm is left to settle, controller errors are cleared, and the
        next target starts a new motion from rest. Anything else, or one too many, is for the caller."""
        text = str(e)
        if "Motion planner failed" not in text or not ("-110" in text or "-111" in text):
            return False
        now = self._clock()
        window = self.config.planner_retry_window_s
        recent = [t for t, _ in self.planner_recoveries if now - t <= window]
        if len(recent) >= self.config.planner_retries:
            self._set_error(f"motion aborted: {type(e).__name__}: {e} ({len(recent)} planner failures recovered from "
                            f"in the last {window:.0f} s already, the most allowed: see FrankyConfig.planner_retries)")
            return True
        self.planner_recoveries.append((now, text))
        self._resume_at = now + self.config.planner_settle_s
        log.warning("%s: %s: the motion ended and the arm stops; resuming with a new motion after %.1f s "
                    "(%d of %d allowed in %.0f s)", self.name, text, self.config.planner_settle_s,
                    len(recent) + 1, self.config.planner_retries, window)
        try:
            if self._robot.has_errors:
                self._robot.recover_from_errors()
        except Exception as err:
            self._set_error(f"recovery after a planner failure failed: {type(err).__name__}: {err}")
        return True

    def _own_preemption(self, e: Exception) -> bool:
        # A stop preempts the running motion; libfranka may report that on the next poll or move,
        # even after a new motion started. Only our own stop preempts a motion, so within a second
        # of one it is not a fault.
        return "preempted" in str(e).lower() and (self._stopping or self._clock() < self._preempt_expected_until)

    def _send_stop(self) -> None:
        self._stopping = True
        self._preempt_expected_until = self._clock() + 1.0
        if self._link_lost:
            # Nothing can reach the controller; it stops the arm by itself when the command stream
            # it expects every millisecond stops arriving (libfranka's communication reflex).
            self._set_error(f"stop not sent: link to {self.config.host} lost (the controller's communication reflex stops a real arm)")
            return
        try:
            self._robot.stop()
        except Exception as e:
            self._set_error(f"stop failed: {type(e).__name__}: {e} (the controller's communication reflex stops a real arm)")
        # Clear the preemption exception our own stop provokes, so it is not reported as a fault.
        try:
            self._robot.poll_motion()
        except Exception:
            pass

    def set_gripper(self, closed: bool) -> None:
        """Record the wanted state; the gripper thread carries it out (never blocks the caller)."""
        if self._gripper is not None:
            self._gripper_wanted = bool(closed)

    def _gripper_loop(self) -> None:
        # Every call on the franky Gripper happens in this one thread: a command issued while
        # another thread reads the width (or after Gripper.stop) can block indefinitely in libfranka.
        c = self.config
        done: bool | None = None
        while not self._stop_monitor.is_set():
            wanted = self._gripper_wanted
            try:
                if wanted is not None and wanted != done:
                    if wanted:
                        # epsilon_outer=1: any object width counts as grasped; we want a firm grip only.
                        self._gripper.grasp(0.0, c.gripper_speed, c.gripper_force, 0.005, 1.0)
                    else:
                        self._gripper.move(c.gripper_open_width, c.gripper_speed)
                    done = wanted
                self._gripper_width = float(self._gripper.width)
            except Exception as e:
                self._set_error(f"gripper failed: {type(e).__name__}: {e}")
                return
            self._stop_monitor.wait(0.05)

    def recover(self) -> bool:
        if self._robot is None:
            return False
        try:
            ok = bool(self._robot.recover_from_errors())
        except Exception as e:
            log.error("%s: recovery failed: %s", self.name, e)
            return False
        if ok:
            self._error = None
        return ok
