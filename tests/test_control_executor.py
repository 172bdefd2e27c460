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
])
def test_safety_config_validation_names_field(kw, match):
    with pytest.raises(ValueError, match=match):
        SafetyConfig(**kw)
