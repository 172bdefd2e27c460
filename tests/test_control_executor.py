"""Executor timing, stale-prefix handling, safety layer and watchdog, driven by a fake clock."""

from __future__ import annotations

import numpy as np
import pytest

from molmoact_edge.hardware.geometry import Pose, quat_angle
from molmoact_edge.runtime.control.clock import FakeClock
from molmoact_edge.runtime.control.convention import ActionConvention
from molmoact_edge.runtime.control.executor import Executor, Watchdog, WatchdogConfig
from molmoact_edge.runtime.control.policy import ActionChunk
from molmoact_edge.runtime.control.safety import GripperHysteresis, SafetyConfig, SafetyLayer

HOME = Pose((0.5, 0.0, 0.4), (1.0, 0.0, 0.0, 0.0))
PERIOD = 0.02  # 50 Hz
CONV = ActionConvention(control_period_s=0.1)


def make_executor(**safety):
    cfg = SafetyConfig(**safety)
    return Executor(SafetyLayer(cfg, PERIOD), GripperHysteresis(cfg.gripper_hysteresis))


def chunk(actions, obs_t, anchor=HOME, conv=CONV, index=0):
    return ActionChunk(np.asarray(actions, float), obs_t, index, anchor, conv, finished_at=obs_t)


def steps_x(n, dx=0.004, grip=1.0):
    return [[dx, 0, 0, 0, 0, 0, grip]] * n


def test_waypoints_due_on_schedule_and_interpolated_every_tick():
    clock = FakeClock(100.0)
    ex = make_executor()
    acc = ex.accept(chunk(steps_x(4), obs_t=100.0), clock.now(), HOME)
    assert acc.ok and acc.schedule == "arrival" and acc.dropped == 0 and acc.kept == 4
    xs = []
    for _ in range(25):  # 0.5 s at 50 Hz covers the 0.4 s chunk; the accepting tick is the first
        s = ex.step(clock.now(), HOME)
        if s.target is not None:
            xs.append(s.target.p[0])
        clock.advance(PERIOD)
    # Every tick during the plan moves the target (0.004 m per 0.1 s = 0.0008 m per tick), then it holds.
    assert len(xs) == 20
    np.testing.assert_allclose(np.diff(xs), 0.0008, atol=1e-9)
    assert xs[-1] == pytest.approx(0.516)
    assert ex.idle


def test_late_chunk_drops_stale_prefix_while_moving():
    clock = FakeClock(100.0)
    ex = make_executor()
    ex.accept(chunk(steps_x(8), obs_t=100.0), clock.now(), HOME)  # plan runs until 100.8
    # An observation taken at 100.1 while moving; its chunk arrives 0.35 s later.
    clock.t = 100.45
    acc = ex.accept(chunk(steps_x(8, dx=-0.004), obs_t=100.1, index=1), clock.now(), HOME)
    assert acc.ok and acc.schedule == "observation"
    assert acc.dropped == 3  # due at 100.2, 100.3, 100.4 <= 100.45
    assert [w.index for w in ex.plan] == [3, 4, 5, 6, 7]
    # The kept targets stay anchored at the observation pose: index 3 is anchor - 4 * 0.004.
    assert ex.plan[0].pose.p[0] == pytest.approx(0.5 - 0.016)


def test_chunk_after_standing_still_is_scheduled_from_arrival():
    ex = make_executor()
    ex.accept(chunk(steps_x(2), obs_t=100.0), 100.0, HOME)  # plan ends at 100.2
    acc = ex.accept(chunk(steps_x(4), obs_t=101.0, index=1), 104.0, HOME)  # 3 s inference, robot idle
    assert acc.schedule == "arrival" and acc.dropped == 0
    assert ex.plan[0].due == pytest.approx(104.08)  # the accepting tick (104.0) is the first of 5


def test_all_stale_keeps_only_the_final_target():
    ex = make_executor()
    ex.accept(chunk(steps_x(8), obs_t=100.0), 100.0, HOME)  # moving until 100.8
    acc = ex.accept(chunk(steps_x(2), obs_t=100.1, index=1), 100.6, HOME)
    assert acc.dropped == 2 and acc.kept == 1
    assert ex.plan[0].pose.p[0] == pytest.approx(0.508) and ex.plan[0].due == pytest.approx(100.7)


@pytest.mark.fault
def test_nonfinite_chunk_rejected_and_plan_kept():
    ex = make_executor()
    ex.accept(chunk(steps_x(4), obs_t=100.0), 100.0, HOME)
    bad = steps_x(4)
    bad[2] = [0.0, np.nan, 0, 0, 0, 0, 1]
    acc = ex.accept(chunk(bad, obs_t=100.1, index=1), 100.2, HOME)
    assert not acc.ok and "non-finite" in acc.reason
    assert len(ex.plan) == 4  # the loop stops the arm and clears; the executor itself never adopts it


def test_step_and_workspace_limits_clamp():
    ex = make_executor(workspace_max=(0.52, 0.4, 0.7))
    # One action asks for +0.1 m within 0.1 s: 1 m/s, four times the default 0.25 m/s limit.
    ex.accept(chunk([[0.1, 0, 0, 0, 0, 0, 1]], obs_t=100.0), 100.0, HOME)
    t, last, seen = 100.0, HOME, set()
    for _ in range(30):
        t += PERIOD
        s = ex.step(t, HOME)
        seen.update(s.interventions)
        if s.target is not None:
            assert np.linalg.norm(s.target.p - last.p) <= 0.25 * PERIOD + 1e-12
            assert s.target.p[0] <= 0.52 + 1e-12
            last = s.target
    assert {"step_clamp", "workspace_clamp"} <= seen
    assert last.p[0] == pytest.approx(0.52)


def test_rotation_step_limited():
    layer = SafetyLayer(SafetyConfig(max_rot_speed_rad_s=1.0), PERIOD)
    target = Pose(HOME.position, (0.0, 1.0, 0.0, 0.0))  # 180 degrees away
    f = layer.filter(target, HOME)
    assert "rotation_clamp" in f.interventions
    assert quat_angle(f.target.q, HOME.q) == pytest.approx(1.0 * PERIOD, abs=1e-9)


@pytest.mark.fault
def test_nonfinite_target_refused():
    layer = SafetyLayer(SafetyConfig(), PERIOD)

    class Bad:  # Pose refuses NaN at construction, so build the raw arrays a buggy plan could produce
        p = np.array([np.nan, 0, 0])
        q = np.array([0, 0, 0, 1.0])

    f = layer.filter(Bad(), HOME)
    assert f.target is None and f.interventions == ["nonfinite_refused"]


def test_gripper_hysteresis_commands_only_on_change():
    h = GripperHysteresis(band=0.2)
    seq = [0.0, 0.1, 0.55, 0.59, 0.61, 0.9, 0.5, 0.41, 0.39, 0.2, 0.45, 0.61]
    out = [h.update(v) for v in seq]
    assert out == [False, None, None, None, True, None, None, None, False, None, None, True]


def test_gripper_commanded_once_per_change_through_the_executor():
    ex = make_executor()
    actions = steps_x(2, grip=1.0) + steps_x(3, grip=0.0)  # open, open, close, close, close
    ex.accept(chunk(actions, obs_t=100.0), 100.0, HOME)
    commands = []
    t = 100.0
    for _ in range(30):
        t += PERIOD
        g = ex.step(t, HOME).gripper
        if g is not None:
            commands.append((round(t - 100.0, 2), g))
    assert [c[1] for c in commands] == [False, True]
    assert commands[1][0] == pytest.approx(0.20)  # the first tick of action 2's interval (t0 = -1 tick)


@pytest.mark.fault
def test_watchdog_faults_and_their_times():
    wd = Watchdog(WatchdogConfig(frame_timeout_s=0.2, action_timeout_s=1.0))
    ok = wd.check(10.0, 9.9, 0.0, None, None, None, None)
    assert ok is None
    stall = wd.check(10.25, 10.0, 0.0, None, None, None, None)
    assert stall.kind == "camera_stall" and stall.occurred_at == pytest.approx(10.2) and "250 ms old" in stall.message
    hung = wd.check(12.0, 11.95, 0.0, 10.5, None, None, None)
    assert hung.kind == "no_actions" and hung.occurred_at == pytest.approx(11.5)
    dead = wd.check(12.0, 11.95, 0.0, None, "policy.predict raised:\nTraceback...\nRuntimeError: boom", 11.99, None)
    assert dead.kind == "policy_error" and "RuntimeError: boom" in dead.message and dead.occurred_at == 11.99
    arm = wd.check(12.0, 11.95, 0.0, None, None, None, "no new robot state")
    assert arm.kind == "arm_error"
    never = wd.check(5.3, None, 5.0, None, None, None, None)
    assert never.kind == "camera_stall" and "no frame at all" in never.message


@pytest.mark.parametrize("kw,match", [
    ({"workspace_min": (0.8, 0, 0)}, "workspace_max"),
    ({"max_speed_m_s": 2.0}, "max_speed_m_s"),
    ({"dynamics_factor": 0.9}, "dynamics_factor"),
    ({"gripper_hysteresis": 1.5}, "gripper_hysteresis"),
    ({"max_lead_rad": 0.0}, "max_lead_rad"),
    ({"max_lead_rad": 4.0}, "max_lead_rad"),
    ({"max_reach_m": 0.1}, "max_reach_m"),
    ({"max_reach_m": float("nan")}, "max_reach_m"),
])
def test_safety_config_validation_names_field(kw, match):
    with pytest.raises(ValueError, match=match):
        SafetyConfig(**kw)


# -- limits that follow the measured arm (issue 9, item 5)

def run_plan(ex, actions, current_of, ticks, t0=100.0):
    """Feed one chunk, then tick; `current_of(k, last_target)` is the measured pose at tick k."""
    ex.accept(chunk(actions, obs_t=t0), t0, HOME)
    t, out, last = t0, [], None
    for k in range(ticks):
        t += PERIOD
        cur = current_of(k, last)
        s = ex.step(t, cur)
        if s.target is not None:
            last = s.target
        out.append((cur, last, s.interventions))
    return out


@pytest.mark.fault
def test_command_never_leads_a_stuck_arm_by_more_than_the_bound():
    ex = make_executor(max_lead_m=0.04)
    # Eight actions of +3 cm each: 0.24 m in 0.8 s (the plan is within the 0.25 m/s step limit...
    # almost), while the arm does not move at all.
    ticks = run_plan(ex, steps_x(8, dx=0.03), lambda k, last: HOME, 200)
    leads = [np.linalg.norm(last.p - cur.p) for cur, last, _ in ticks if last is not None]
    assert max(leads) <= 0.04 + 1e-12
    assert max(leads) > 0.039  # it does move up to the bound
    assert any("lead_clamp" in iv for *_, iv in ticks)


def test_command_follows_the_arm_once_it_moves_again():
    ex = make_executor(max_lead_m=0.04)
    # The arm is stuck for 1 s, then tracks the command perfectly: the target resumes at step pace.
    ticks = run_plan(ex, steps_x(8, dx=0.02), lambda k, last: HOME if k < 50 or last is None else last, 120)
    xs = [last.p[0] for _, last, _ in ticks if last is not None]
    assert np.all(np.diff(xs) <= 0.25 * PERIOD + 1e-12)
    assert xs[-1] == pytest.approx(0.5 + 0.16)


@pytest.mark.fault
def test_previous_target_outside_the_box_walks_back_at_the_step_limit():
    layer = SafetyLayer(SafetyConfig(), PERIOD)
    outside = Pose((0.95, 0.0, 0.4), HOME.quaternion)  # 0.2 m beyond workspace_max x = 0.75
    previous, xs = outside, []
    for _ in range(100):  # 0.45 m at 5 mm per tick
        f = layer.filter(HOME, previous, previous)  # the arm follows the command exactly
        assert np.linalg.norm(f.target.p - previous.p) <= layer.max_step_m + 1e-12
        previous = f.target
        xs.append(previous.p[0])
    assert np.all(np.diff(xs[:90]) < 0)  # straight back toward the box, never a jump onto it
    assert xs[-1] == pytest.approx(0.5)
    assert layer.counts.get("return_to_box", 0) >= 40


def test_orientation_stays_in_the_cone_around_the_start_tool_axis():
    from molmoact_edge.runtime.control.safety import tilt, tool_axis

    layer = SafetyLayer(SafetyConfig(max_tilt_rad=0.5), PERIOD)
    layer.anchor(HOME)
    up = Pose(HOME.position, (0.0, 0.0, 0.0, 1.0))  # identity: the gripper points up, 180 degrees away
    previous, tilts = HOME, []
    for _ in range(400):
        f = layer.filter(up, previous, previous)
        previous = f.target
        tilts.append(tilt(previous.q, tool_axis(HOME.q)))
    assert max(tilts) <= 0.5 + 1e-6 and tilts[-1] == pytest.approx(0.5, abs=1e-6)
    assert "tilt_clamp" in layer.counts
    # Turning about the tool axis itself is not restricted.
    yaw = Pose(HOME.position, (np.cos(0.6), np.sin(0.6), 0.0, 0.0))  # 1.2 rad about the tool axis
    previous = HOME
    for _ in range(100):
        previous = layer.filter(yaw, previous, previous).target
    assert quat_angle(previous.q, yaw.q) < 1e-6


@pytest.mark.fault
def test_measured_pose_outside_the_box_beyond_the_margin_is_a_fault():
    layer = SafetyLayer(SafetyConfig(box_margin_m=0.03), PERIOD)
    assert layer.check_measured(Pose((0.77, 0.0, 0.4), HOME.quaternion)) is None  # 2 cm out: overshoot
    msg = layer.check_measured(Pose((0.79, 0.0, 0.4), HOME.quaternion))
    assert msg is not None and "40 mm outside the workspace" in msg


def test_lead_bound_never_drags_the_target_after_the_arm():
    layer = SafetyLayer(SafetyConfig(max_lead_m=0.04), PERIOD)
    pushed = Pose((0.5, 0.0, 0.30), HOME.quaternion)  # the arm is 10 cm below the command (a push, a drop)
    f = layer.filter(HOME, HOME, pushed)
    np.testing.assert_allclose(f.target.p, HOME.p)  # holds; it does not follow the arm down
    # And a move that would increase the lead beyond both the bound and the present lead is held back.
    f = layer.filter(Pose((0.5, 0.0, 0.45), HOME.quaternion), HOME, pushed)
    assert np.linalg.norm(f.target.p - pushed.p) <= 0.10 + 1e-12 and "lead_clamp" in f.interventions


def yaw_pose(angle):
    """HOME turned by `angle` about its tool axis (inside any tilt cone)."""
    return Pose(HOME.position, (np.cos(angle / 2), np.sin(angle / 2), 0.0, 0.0))


@pytest.mark.fault
def test_commanded_orientation_never_leads_a_stuck_wrist_by_more_than_the_bound():
    layer = SafetyLayer(SafetyConfig(max_lead_rad=0.2), PERIOD)
    goal, previous, leads = yaw_pose(1.2), HOME, []
    for _ in range(200):  # 4 s of a 1.2 rad turn at 1 rad/s while the arm does not turn at all
        f = layer.filter(goal, previous, HOME)
        previous = f.target
        leads.append(quat_angle(previous.q, HOME.q))
    assert max(leads) <= 0.2 + 1e-6
    assert max(leads) > 0.199  # it does turn up to the bound
    assert layer.counts.get("turn_lead_clamp", 0) > 0
    # Released, the wrist follows the command exactly: the turn resumes at the step limit, to the goal.
    angles = []
    for _ in range(100):
        previous = layer.filter(goal, previous, previous).target
        angles.append(quat_angle(previous.q, HOME.q))
    assert np.all(np.diff(angles) <= layer.max_step_rad + 1e-6)
    assert quat_angle(previous.q, goal.q) < 1e-6


def test_orientation_lead_bound_never_drags_the_target_after_the_wrist():
    layer = SafetyLayer(SafetyConfig(max_lead_rad=0.2), PERIOD)
    turned = yaw_pose(0.5)  # the wrist was pushed 0.5 rad away from the command
    f = layer.filter(HOME, HOME, turned)
    assert quat_angle(f.target.q, HOME.q) < 1e-9  # holds; it does not follow the wrist
    f = layer.filter(yaw_pose(-0.5), HOME, turned)  # turning further away from the wrist is held back
    assert quat_angle(f.target.q, turned.q) <= 0.5 + 1e-6 and "turn_lead_clamp" in f.interventions


# -- reach (issue 11 item 3: the box's top front corner lies beyond what a Franka can stretch to)

SIM_START = Pose((0.5544, 0.0, 0.5214), (1.0, 0.0, 0.0, 0.0))  # franky-sim's start pose, gripper down


def wrist_distance(pose: Pose) -> float:
    """Shoulder (0, 0, 0.333) to the point 0.2104 m behind the TCP along its tool axis, computed here
    from the rotation matrix (a Panda/FR3 flange 0.107 m plus the Franka Hand's TCP 0.1034 m)."""
    x, y, z, w = pose.quaternion
    tool_z = np.array([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)])
    return float(np.linalg.norm(np.asarray(pose.position) - 0.2104 * tool_z - np.array([0.0, 0.0, 0.333])))


@pytest.mark.fault
@pytest.mark.parametrize("q", [(1.0, 0.0, 0.0, 0.0), (0.9239, 0.0, 0.3827, 0.0)])  # down; tilted 45 degrees
def test_targets_stay_within_the_arm_s_reach(q):
    layer = SafetyLayer(SafetyConfig(), PERIOD)
    corner = Pose((0.75, 0.0, 0.70), q)  # the default box's top front corner: 0.95 m with the gripper down
    start = Pose(SIM_START.position, q)
    assert wrist_distance(corner) > 0.78
    previous, dists = start, []
    for _ in range(300):
        f = layer.filter(corner, previous, previous)
        assert np.linalg.norm(f.target.p - previous.p) <= layer.max_step_m + 1e-12
        previous = f.target
        dists.append(wrist_distance(previous))
    assert max(dists) <= 0.75 + 1e-9 and dists[-1] == pytest.approx(0.75, abs=1e-6)
    assert "reach_clamp" in layer.counts
    assert SafetyConfig().contains(np.asarray(previous.p))
    # Switched off (another arm), the same stream ends on the corner.
    free = SafetyLayer(SafetyConfig(max_reach_m=None), PERIOD)
    previous = start
    for _ in range(300):
        previous = free.filter(corner, previous, previous).target
    assert np.allclose(previous.p, corner.p) and "reach_clamp" not in free.counts


@pytest.mark.fault
def test_previous_target_beyond_reach_walks_back_at_the_step_limit():
    layer = SafetyLayer(SafetyConfig(), PERIOD)
    stretched = Pose((0.74, 0.0, 0.69), SIM_START.quaternion)  # inside the box, 0.94 m from the shoulder
    previous, dists = stretched, []
    for _ in range(100):
        f = layer.filter(stretched, previous, previous)  # the policy insists on the far target
        assert np.linalg.norm(f.target.p - previous.p) <= layer.max_step_m + 1e-12
        previous = f.target
        dists.append(wrist_distance(previous))
    assert np.all(np.diff(dists[:30]) < 0) and dists[-1] == pytest.approx(0.75, abs=1e-6)
