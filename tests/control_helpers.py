"""Shared helpers for the test_hw_* and test_control_* tests (imported explicitly, not a conftest)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from molmoact_edge.hardware.camera import Intrinsics

INTR = Intrinsics(64, 48, 50.0, 50.0, 32.0, 24.0)

# Test-only "no new robot state" limit for franky-sim (the driver's default is 100 ms). On a loaded
# 2-core CI machine the simulator or our monitor thread can miss 100 ms of CPU and the watchdog
# fires on a healthy link (3 of 6 reruns failed that way); at 0.5 s, 1 of 20 fault-suite runs at
# load 5-11 still did (the simulator got no CPU for 511 ms). The tests check what the watchdog does,
# not how fast a shared CPU is; the sim-killed test asserts detection against this same limit.
STATE_TIMEOUT_S = 2.0


def synthetic_frames(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, 255, (INTR.height, INTR.width, 3), dtype=np.uint8),
         rng.integers(0, 5000, (INTR.height, INTR.width), dtype=np.uint16))
        for _ in range(n)
    ]


def write_folder(path: Path, n: int, fps: float = 30.0, seed: int = 0):
    from molmoact_edge.hardware.recording import FolderWriter

    frames = synthetic_frames(n, seed)
    with FolderWriter(path, INTR) as w:
        for i, (c, d) in enumerate(frames):
            w.write(c, d, i / fps)
    return frames


def sim_available() -> bool:
    try:
        from molmoact_edge.hardware.sim import franky_sim_command

        franky_sim_command()
        import franky  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture
def sim():
    """A fresh franky-sim subprocess per test (about 2 s), on its own loopback address, killed after.

    Fresh per test so that one test's end pose (or fault) never becomes the next one's start."""
    if not sim_available():
        pytest.skip("franky-sim / franky-control not installed: pip install molmoact-edge[robot,test]")
    from molmoact_edge.hardware.sim import SimServer

    server = SimServer().start()
    try:
        yield server
    finally:
        server.close()


def check_commands(records: list[dict], safety, period: float) -> dict:
    """Independent audit of every commanded target in a run log against the safety limits.

    Recomputed from the raw log, not from the safety layer's own flags: inside the workspace, one
    step at most from the previous command (or from the measured pose after a start or stop: no
    clamp may jump), near the measured position and orientation, tool axis inside the cone around
    the start pose. Returns the worst values.
    """
    lo, hi = np.asarray(safety.workspace_min), np.asarray(safety.workspace_max)
    max_step = safety.max_speed_m_s * period
    max_rot = safety.max_rot_speed_rad_s * period
    from molmoact_edge.hardware.geometry import quat_angle
    from molmoact_edge.runtime.control.safety import tilt, tool_axis

    # pose_outside_m: how far the *measured* arm went outside the box (overshoot); reported, not a
    # property of the commands.
    worst = {"outside_m": 0.0, "step_m": 0.0, "step_rad": 0.0, "commands": 0, "pose_outside_m": 0.0,
             "lead_m": 0.0, "lead_rad": 0.0, "tilt_rad": 0.0, "reach_m": 0.0}
    reach = getattr(safety, "max_reach_m", None)
    shoulder = np.array([0.0, 0.0, 0.333])  # a Panda/FR3's joint 2 above its base
    prev = None
    axis0 = None
    for r in records:
        if r["kind"] == "anchor":
            axis0 = tool_axis(np.asarray(r["pose"]["q"]))
        if r["kind"] == "stop":
            prev = None  # after a stop the executor re-anchors at the measured pose
            continue
        if r["kind"] != "command":
            continue
        worst["commands"] += 1
        p = np.asarray(r["target"]["p"])
        q = np.asarray(r["target"]["q"])
        assert np.all(np.isfinite(p)) and np.all(np.isfinite(q)), f"non-finite command {r}"
        ref_p = np.asarray(prev["p"] if prev is not None else r["pose"]["p"])
        ref_q = np.asarray(prev["q"] if prev is not None else r["pose"]["q"])
        out = float(np.max(np.maximum(lo - p, 0) + np.maximum(p - hi, 0)))
        if out > 1e-5:  # only a command walking back from outside the box may lie outside it
            ref_out = float(np.max(np.maximum(lo - ref_p, 0) + np.maximum(ref_p - hi, 0)))
            assert out < ref_out, f"a command left the workspace by {out} m"
        else:
            worst["outside_m"] = max(worst["outside_m"], out)
        m = np.asarray(r["pose"]["p"])
        worst["pose_outside_m"] = max(worst["pose_outside_m"], float(np.max(np.maximum(lo - m, 0) + np.maximum(m - hi, 0))))
        lead = float(np.linalg.norm(p - m))
        # The target keeps within max_lead_m of the arm, or no farther than the previous command
        # was when the arm itself moved away (it is held back, never dragged after the arm).
        allowed = max(safety.max_lead_m, float(np.linalg.norm(ref_p - m)))
        assert lead <= allowed + 1e-5, f"a command led the arm by {lead} m > {allowed} m: {r}"
        worst["lead_m"] = max(worst["lead_m"], lead)
        turn = quat_angle(q, np.asarray(r["pose"]["q"]))  # the same for the orientation
        allowed = max(safety.max_lead_rad, quat_angle(ref_q, np.asarray(r["pose"]["q"])))
        assert turn <= allowed + 1e-4, f"a command led the arm's orientation by {turn} rad > {allowed} rad: {r}"
        worst["lead_rad"] = max(worst["lead_rad"], turn)
        worst["step_m"] = max(worst["step_m"], float(np.linalg.norm(p - ref_p)))
        worst["step_rad"] = max(worst["step_rad"], quat_angle(ref_q, q))
        if axis0 is not None:
            worst["tilt_rad"] = max(worst["tilt_rad"], tilt(q, axis0))
        # The wrist: 0.107 m flange + 0.1034 m Franka Hand TCP behind the target along its tool axis.
        wrist = float(np.linalg.norm(p - 0.2104 * tool_axis(q) - shoulder))
        if reach is not None and wrist > reach + 1e-5:
            # Only a command walking back may lie beyond reach: a turn of the tool moves the wrist, so
            # the previous position can fall outside; the step then must not take the wrist farther.
            ref_wrist = float(np.linalg.norm(ref_p - 0.2104 * tool_axis(q) - shoulder))
            assert wrist <= ref_wrist + 1e-5, f"a command put the wrist {wrist} m from the shoulder (> {reach}): {r}"
        else:
            worst["reach_m"] = max(worst["reach_m"], wrist)
        prev = r["target"]
    # 1e-5: the log rounds to 6 decimals
    assert worst["outside_m"] <= 1e-5, f"a command left the workspace by {worst['outside_m']} m"
    assert worst["step_m"] <= max_step + 1e-5, f"a command stepped {worst['step_m']} m > {max_step} m"
    assert worst["step_rad"] <= max_rot + 1e-4, f"a command rotated {worst['step_rad']} rad > {max_rot} rad"
    assert worst["tilt_rad"] <= safety.max_tilt_rad + 1e-3, f"a command tilted the tool {worst['tilt_rad']} rad"
    return worst


def wait_for(pred, timeout: float = 5.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")
