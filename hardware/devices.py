"""Cameras and arms from the command line's device specs (``realsense:SERIAL``, ``replay:PATH``,
``franka:IP``, ``sim``): the one place that maps a spec to a driver, for `run`, `record` and scripts."""

from __future__ import annotations

import contextlib
import sys


def open_camera(spec: str, record: str | None = None):
    from molmoact_edge.hardware.realsense import RealSenseCamera, RealSenseConfig
    from molmoact_edge.hardware.replay import ReplayConfig, open_replay

    kind, _, arg = spec.partition(":")
    if kind == "realsense":
        return RealSenseCamera(RealSenseConfig(serial=arg or None, record_to=record))
    if kind == "replay":
        if not arg:
            raise ValueError("--camera replay:PATH needs a path (a .db3 recording or an image folder)")
        return open_replay(ReplayConfig(arg))
    raise ValueError(f"--camera {spec!r}: expected realsense, realsense:SERIAL or replay:PATH")


ROBOT_STATE_TIMEOUT_S = 0.1  # a Franka's link: no new state for this long means the link is lost
SIM_STATE_TIMEOUT_S = 0.5  # --robot sim: no new state for this long means the simulator is gone


@contextlib.contextmanager
def open_robot(spec: str, dynamics: float, gripper: bool, state_timeout_s: float | None = None,
               release_at_exit: bool = False):
    """state_timeout_s: None picks the default for the kind of robot (see the constants above);
    release_at_exit: for a process that ends after the run (FrankyConfig.release_at_exit)."""
    from molmoact_edge.hardware.franky_arm import FrankyArm, FrankyConfig

    kind, _, host = spec.partition(":")
    if kind not in ("franka", "sim"):
        raise ValueError(f"--robot {spec!r}: expected franka:IP, sim or sim:HOST")
    if kind == "franka" and not host:
        raise ValueError("--robot franka:IP needs the robot's FCI address, e.g. franka:172.16.0.2")
    # A local simulator that waits for CPU freezes its clock for longer than a real controller's
    # link may go silent (100 ms): the simulator gets its own default.
    default_timeout = ROBOT_STATE_TIMEOUT_S if kind == "franka" else SIM_STATE_TIMEOUT_S
    with contextlib.ExitStack() as stack:
        if kind == "sim" and not host:  # `--robot sim`: a franky-sim of our own, for this run
            from molmoact_edge.hardware.sim import SimServer

            host = stack.enter_context(SimServer()).host
            print(f"franky-sim running on {host}", file=sys.stderr)
        config = FrankyConfig(host, dynamics_factor=dynamics, gripper=gripper,
                              state_timeout_s=default_timeout if state_timeout_s is None else state_timeout_s,
                              release_at_exit=release_at_exit)
        yield stack.enter_context(FrankyArm(config))
