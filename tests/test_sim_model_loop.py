"""The README's model-in-the-loop command on franky-sim, and what the simulated arm does when no motion runs.

The model is the golden tiny checkpoint exported to a bundle: random weights ask for large, steady
rotations (about 1.3 rad/s), so this is the case that used to end in franky planner aborts. The run goes
through the real CLI, franky-sim, onnxruntime and the JSONL log, which is audited independently.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from control_helpers import check_commands, sim, sim_available, write_folder  # noqa: F401  (sim is a fixture)

from molmoact_edge.runtime.control.runlog import read_log
from molmoact_edge.runtime.control.safety import SafetyConfig

RATE = 50.0
DURATION_S = 10.0


@pytest.fixture(scope="module")
def bundle(bundle_a):
    return bundle_a  # fixture A exported (or handed over to a robot install by MOLMOACT_TEST_BUNDLES)


@pytest.mark.sim
def test_model_in_the_loop_on_franky_sim_stays_within_limits_and_stops_cleanly(bundle, tmp_path):
    """The README's command (issue 11 item 3) runs its whole duration, every command within the limits
    (the reach bound included). Before the reach bound and the planner-failure recovery it ended in a
    runaway or a Ruckig -111 in 4 of 5 runs on a quiet machine. The only other ending allowed: a
    simulator starved of CPU for the state timeout, named as such, with nothing commanded after it."""
    if not sim_available():
        pytest.skip("franky-sim / franky-control not installed: pip install molmoact-edge[robot,sim]")
    write_folder(tmp_path / "frames", 10)
    log_path = tmp_path / "run.jsonl"
    cmd = [sys.executable, "-m", "molmoact_edge", "run", "--camera", f"replay:{tmp_path / 'frames'}", "--robot", "sim",
           "--instruction", "close the box", "--policy", "molmoact", "--bundle", str(bundle),
           "--duration", str(DURATION_S), "--rate", str(RATE), "--log", str(log_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    records = read_log(log_path)
    end = [r for r in records if r["kind"] == "end"]
    assert end, f"no end record; exit {proc.returncode}\n{proc.stderr[-3000:]}"
    stops = [r for r in records if r["kind"] == "stop" and r.get("fault")]
    if end[-1]["reason"] == "duration":
        assert proc.returncode == 0 and not stops
    else:
        message = stops[-1]["message"] if stops else ""
        # (a lost link cannot carry the stop: the controller's communication reflex stops a real arm)
        assert end[-1]["fault"] == "arm_error" and "no new robot state" in message, \
            f"run ended by {end[-1]}: {stops}\n{proc.stderr[-2000:]}"
        assert not [r for r in records if r["kind"] == "command" and r["t"] > stops[-1]["t"]]
        print(f"the simulator was starved: {message}")

    start = records[0]
    assert start["kind"] == "start"
    safety = SafetyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in start["safety"].items()})
    # The stream never asks for more than franky's planner may do at this dynamics factor (per axis
    # 1.7 m/s and 2.5 rad/s for a Franka, times the factor), so the planner keeps up with it.
    assert safety.max_speed_m_s <= 1.7 * safety.dynamics_factor + 1e-9
    assert safety.max_rot_speed_rad_s <= 2.5 * safety.dynamics_factor + 1e-9
    audit = check_commands(records, safety, 1.0 / RATE)  # whatever was sent is within the limits
    if end[-1]["reason"] == "duration":
        assert audit["commands"] > 0 and end[-1]["chunks"] >= 1
        # The model asked for more rotation than that: the limit, not the model, set the pace.
        assert end[-1]["interventions"].get("rotation_clamp", 0) > 0


@pytest.mark.fault
@pytest.mark.sim
def test_franky_sim_holds_the_arm_after_a_stop(sim):  # noqa: F811
    """franky-sim holds the last desired joint configuration (PD plus gravity compensation) when no
    motion runs, as a real Franka holds with its brakes: the hand does not sag under gravity."""
    from molmoact_edge.hardware.franky_arm import FrankyArm, FrankyConfig
    from molmoact_edge.hardware.geometry import Pose

    with FrankyArm(FrankyConfig(sim.host, dynamics_factor=0.2, gripper=False)) as arm:
        start = arm.state().pose
        arm.move_to(Pose(tuple(start.p + np.array([0.0, 0.03, -0.03])), start.quaternion))
        deadline = time.monotonic() + 30.0
        while np.linalg.norm(arm.state().pose.p - start.p) < 0.02 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert arm.stop(wait_s=2.0)
        time.sleep(0.3)  # the stop ramps the motion down
        held = arm.state()
        deadline = time.monotonic() + 30.0  # simulated time, not wall time, is what must pass
        while arm.state().robot_time_s - held.robot_time_s < 1.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        later = arm.state()
        assert later.error is None, later.error
        assert later.robot_time_s - held.robot_time_s >= 1.0  # a second of simulated time passed
        assert np.linalg.norm(later.pose.p - held.pose.p) < 1e-3
        # franky's planner limits were read at connect, and the controller clock rate was measured
        assert arm.speed_limits == pytest.approx((1.7 * 0.2, 2.5 * 0.2))
        assert arm.slowest_clock_rate is not None and arm.slowest_clock_rate > 0


class _FakeArm:
    name = "franka:fake"

    def __init__(self, speed_limits):
        self.speed_limits = speed_limits


def test_run_streams_no_faster_than_the_arm_can_follow(capsys):
    from molmoact_edge.run_cmd import PLANNER_HEADROOM, _fit_to_arm
    from molmoact_edge.runtime.control.loop import LoopConfig

    config = LoopConfig(safety=SafetyConfig(dynamics_factor=0.1))  # defaults: 0.25 m/s, 1 rad/s
    fitted = _fit_to_arm(config, _FakeArm((0.17, 0.25)))
    assert fitted.safety.max_speed_m_s == pytest.approx(PLANNER_HEADROOM * 0.17)
    assert fitted.safety.max_rot_speed_rad_s == pytest.approx(PLANNER_HEADROOM * 0.25)
    assert fitted.safety.workspace_min == config.safety.workspace_min and fitted.rate_hz == config.rate_hz
    assert "note: streaming at most 0.136 m/s and 0.200 rad/s" in capsys.readouterr().err
    slow = LoopConfig(safety=SafetyConfig(max_speed_m_s=0.05, max_rot_speed_rad_s=0.1))
    assert _fit_to_arm(slow, _FakeArm((0.17, 0.25))) is slow  # already within: untouched, silent
    assert _fit_to_arm(config, _FakeArm(None)) is config  # an arm that cannot tell
    assert capsys.readouterr().err == ""


def test_driver_names_a_controller_clock_that_lags_real_time():
    from molmoact_edge.hardware.franky_arm import FrankyArm, FrankyConfig

    arm = FrankyArm(FrankyConfig("127.0.0.1", min_clock_rate=0.8, clock_window_s=1.0))
    for k in range(5):  # a real-time controller: no note
        arm._track_clock_rate(10.0 + k, 100.0 + k)
    assert arm.slowest_clock_rate == pytest.approx(1.0) and arm._clock_note() == ""
    for k in range(1, 4):  # the clock frozen (link lost) is reported by state(), not as slow
        arm._track_clock_rate(14.0 + k, 104.0)
    assert arm._clock_note() == ""
    for k in range(1, 4):  # 0.3 s of controller time per host second, as measured on a busy machine
        arm._track_clock_rate(17.0 + k, 104.0 + 0.3 * k)
    assert arm.slowest_clock_rate == pytest.approx(0.3)
    arm._set_error("motion aborted: RuntimeError: Motion planner failed with error code -111")
    assert "error code -111 [the controller clock ran at 0.30x real time" in arm._error


@pytest.mark.fault
def test_driver_stops_a_runaway_commanded_twist():
    """franky-sim has no velocity reflex: a command far beyond franky's planner limits (seen at 20 rad/s
    when franky extrapolated missed cycles) is refused by the driver, as a Franka's reflex would."""
    from molmoact_edge.hardware.franky_arm import FrankyArm, FrankyConfig

    arm = FrankyArm(FrankyConfig("127.0.0.1", dynamics_factor=0.1))
    assert arm._runaway(np.array([5.0, 0, 0]), np.zeros(3)) is None  # limits unknown until connected
    arm.speed_limits = (0.17, 0.25)  # franky's per-axis limits at dynamics 0.1
    at_limit = np.full(3, 0.17), np.full(3, 0.25)  # the planner at its limit on every axis
    assert arm._runaway(*at_limit) is None
    assert "running away" in arm._runaway(np.zeros(3), np.array([1.0, 0.3, 0.2]))
    assert "running away" in arm._runaway(np.array([0.7, 0.0, 0.0]), np.zeros(3))


def _gripper_down_trajectory(k: int):
    """Commanded pose k ms into a motion that accelerates from rest: rotation about the base x axis
    around the gripper-down start pose (1.5 rad/s^2) and translation along y (0.9 m/s^2)."""
    import pinocchio as pin

    t = k * 1e-3
    start = pin.rpy.rpyToMatrix(np.pi, 0.0, -np.pi / 4)  # franky-sim's hand, pointing down
    rot = pin.rpy.rpyToMatrix(0.5 * 1.5 * t * t, 0.0, 0.0) @ start
    return pin.SE3(rot, np.array([0.3, 0.5 * 0.9 * t * t, 0.5]))


def test_sim_reports_the_commanded_twist_of_franky_s_planner_not_a_lagging_estimate():
    """The commanded twist and acceleration that franky restarts its planner from (every replaced
    motion) and extrapolates missed cycles with. franky-sim's own estimate trails the command by about
    20 ms (so each restart gives back the velocity the planner had braked away); ours is the planner's
    own 1 ms difference, whatever step the command arrived in, and it is not fed the jump of a command
    that follows missed states."""
    pytest.importorskip("franky_sim", reason="franky-sim not installed: pip install molmoact-edge[sim]")
    from franky_sim.base_simulator import PoseDerivativeTracker

    from molmoact_edge.hardware.sim_launch import CommandedDerivatives

    ids = {"now": 0}
    ours, theirs = CommandedDerivatives(lambda: ids["now"]), PoseDerivativeTracker()
    step = 0
    for k in range(1, 201):
        ids["now"] = k
        step += 2 if k % 7 == 0 else 1  # arrival jitters: every 7th command comes a step late
        ours(step * 1e-3, _gripper_down_trajectory(k))
        theirs(step * 1e-3, _gripper_down_trajectory(k))
    t = 0.2 - 0.5e-3  # a 1 ms backward difference is the velocity half a millisecond back
    truth = np.array([0.0, 0.9 * t, 0.0, 1.5 * t, 0.0, 0.0])
    assert np.allclose(ours.twist, truth, atol=2e-3), ours.twist
    assert np.allclose(ours.acceleration, [0.0, 0.9, 0.0, 1.5, 0.0, 0.0], atol=0.05), ours.acceleration
    assert abs(theirs.last_derivative[3] - truth[3]) > 0.02  # franky-sim's own: more than 13 ms behind

    # Missed states: franky sends its extrapolation of the gap (here a wrong one, 3x too far); the
    # estimate keeps the last exact values instead of feeding that jump back into the next restart.
    before = ours.twist.copy()
    ids["now"] = 204
    overshoot = 2 * (_gripper_down_trajectory(204).translation - _gripper_down_trajectory(200).translation)
    jumped = _gripper_down_trajectory(204)
    jumped.translation = jumped.translation + overshoot
    ours(0.3, jumped)
    assert np.array_equal(ours.twist, before)
    ids["now"] = 205  # franky goes on from where it jumped to: differentiated again, exactly
    following = _gripper_down_trajectory(205)
    following.translation = following.translation + overshoot
    ours(0.301, following)
    t = 0.205 - 0.5e-3
    assert np.allclose(ours.twist, [0.0, 0.9 * t, 0.0, 1.5 * t, 0.0, 0.0], atol=2e-3), ours.twist


class _CommandRecorder:
    """A FrankyArm that also keeps franky's commanded pose with the controller time of each state read."""

    @staticmethod
    def make(config):
        from molmoact_edge.hardware.franky_arm import FrankyArm

        class Recording(FrankyArm):
            def __init__(self, cfg):
                super().__init__(cfg)
                self.commanded = []  # (controller time s, position, quaternion xyzw)

            def _read_state(self):
                st = self._robot.state
                c = st.O_T_EE_c
                self.commanded.append((st.time.to_sec(), np.asarray(c.translation, float), np.asarray(c.quaternion, float)))
                return super()._read_state()

        return Recording(config)


def _peak_commanded_speed(samples, window_s: float = 0.01):
    """Largest speed of franky's commanded pose over controller-time windows of at least `window_s`."""
    from molmoact_edge.hardware.geometry import quat_angle

    v = w = 0.0
    j = 0
    for i in range(1, len(samples)):
        while j < i and samples[i][0] - samples[j + 1][0] >= window_s:
            j += 1
        dt = samples[i][0] - samples[j][0]
        if dt >= window_s:
            v = max(v, float(np.linalg.norm(samples[i][1] - samples[j][1])) / dt)
            w = max(w, quat_angle(samples[i][2], samples[j][2]) / dt)
    return v, w


@pytest.mark.sim
def test_streamed_rotation_around_the_gripper_down_pose_stays_within_franky_s_limits(sim):  # noqa: F811
    """The model-in-the-loop pattern without the model: every 20 ms a new target that replaces the
    running motion, turning about all three axes around the gripper-down start pose and changing
    direction every 0.3-0.7 s, at 80% of franky's limits (what `run` streams). franky's commanded
    pose must stay within what its planner may command (per axis of the rotation vector, so at most
    sqrt(3) times the limit), measured from the commanded poses themselves against controller time.
    Before the simulator fix its command ran away to 0.9-1.2 rad/s here (the planner's limit: 0.25)."""
    from control_helpers import STATE_TIMEOUT_S

    from molmoact_edge.hardware.franky_arm import FrankyConfig
    from molmoact_edge.hardware.geometry import Pose, quat_multiply, rotvec_to_quat

    arm = _CommandRecorder.make(FrankyConfig(sim.host, gripper=False, state_timeout_s=STATE_TIMEOUT_S))
    with arm:
        v_lim, w_lim = arm.speed_limits
        start = arm.state()
        rng = np.random.default_rng(3)
        q, p = start.pose.q, start.pose.p
        w_dir, v_dir, switch_at = np.zeros(3), np.zeros(3), start.robot_time_s
        last = start.robot_time_s
        starved = None
        while True:
            s = arm.state()
            elapsed = s.robot_time_s - start.robot_time_s
            if s.error is not None:
                # The subject is the runaway. A planner abort on a simulator starved of CPU (the driver
                # names the clock rate; -111 seen once in 4 runs at load 14, clock 0.22x) ends the drill
                # early; what was commanded until then is still checked below.
                # (the planner's -111 also came once at 21 ms into the drill on a quiet machine, before
                # any clock rate was measured: a planner abort ends the drill early, a runaway fails it)
                assert "running away" not in s.error or "controller clock ran at" in s.error, s.error
                starved = s.error
                break
            if elapsed >= 4.0:  # controller seconds, whatever the machine's load
                break
            if s.robot_time_s >= switch_at:
                w_dir, v_dir = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)
                w_dir *= 0.8 * w_lim / np.abs(w_dir).max()
                v_dir *= 0.8 * v_lim / np.abs(v_dir).max() / 4
                switch_at = s.robot_time_s + rng.uniform(0.3, 0.7)
            dt = s.robot_time_s - last
            last = s.robot_time_s
            q = quat_multiply(rotvec_to_quat(w_dir * dt), q)
            p = p + v_dir * dt
            arm.move_to(Pose(tuple(p), tuple(q)))
            time.sleep(0.02)
    v, w = _peak_commanded_speed(arm.commanded)
    assert w <= 1.1 * np.sqrt(3) * w_lim, f"commanded rotation reached {w:.2f} rad/s (limit {w_lim} per axis)"
    assert v <= 1.1 * np.sqrt(3) * v_lim, f"commanded translation reached {v:.2f} m/s (limit {v_lim} per axis)"
    if starved is None or elapsed > 1.0:
        assert w > 0.3 * w_lim  # it did turn
    else:
        print(f"drill ended after {elapsed:.2f} s of controller time: {starved}")


@pytest.mark.sim
def test_sim_launch_traces_every_step_of_a_cartesian_motion(tmp_path):
    """`sim_launch --trace` (the diagnosis behind the reach bound, README): one line per simulated
    step while franky streams a pose, with the commanded pose that franky sent and the joints."""
    if not sim_available():
        pytest.skip("franky-sim / franky-control not installed: pip install molmoact-edge[robot,sim]")
    from control_helpers import STATE_TIMEOUT_S, wait_for

    from molmoact_edge.hardware.franky_arm import FrankyArm, FrankyConfig
    from molmoact_edge.hardware.geometry import Pose
    from molmoact_edge.hardware.sim import SimServer

    trace = tmp_path / "steps.jsonl"

    class Traced(SimServer):
        def command(self):
            return super().command() + ["--trace", str(trace)]

    with Traced() as server, FrankyArm(FrankyConfig(server.host, gripper=False, dynamics_factor=0.2,
                                                    state_timeout_s=STATE_TIMEOUT_S)) as arm:
        p0 = arm.state().pose
        goal = Pose(tuple(p0.p + [0.0, 0.01, 0.0]), p0.quaternion)
        arm.move_to(goal)
        wait_for(lambda: arm.state().pose.distance(goal)[0] < 1e-3, 15.0, "the arm to reach the goal")
    import json

    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(steps) > 50 and all(len(s["q"]) == 7 and len(s["q_ik"]) == 7 for s in steps)
    t = np.array([s["t"] for s in steps])
    assert np.all(np.diff(t) > 0)  # one line per step, in order
    y = np.array([s["pose_c"][1] for s in steps])
    assert abs(y[0] - p0.p[1]) < 1e-3 and abs(y[-1] - goal.p[1]) < 1e-4  # franky's stream, start to goal
    assert max(abs(s["twist_c"][1]) for s in steps) > 0.005  # the commanded twist was reported
