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

    kind, _, arg = spec.partition(":")
    if kind == "franka":
        if not arg:
            raise ValueError("--robot franka:IP needs the robot's FCI address, e.g. franka:172.16.0.2")
        timeout = ROBOT_STATE_TIMEOUT_S if state_timeout_s is None else state_timeout_s
        with FrankyArm(FrankyConfig(arg, dynamics_factor=dynamics, gripper=gripper,
                                    state_timeout_s=timeout, release_at_exit=release_at_exit)) as arm:
            yield arm
    elif kind == "sim":
        if arg:
            timeout = SIM_STATE_TIMEOUT_S if state_timeout_s is None else state_timeout_s
            with FrankyArm(FrankyConfig(arg, dynamics_factor=dynamics, gripper=gripper,
                                        state_timeout_s=timeout, release_at_exit=release_at_exit)) as arm:
                yield arm
        else:
            from molmoact_edge.hardware.sim import SimServer

            with SimServer() as sim:
                print(f"franky-sim running on {sim.host}", file=sys.stderr)
                # A local simulator that waits for CPU freezes its clock for longer than a real
                # controller's link may go silent (100 ms): the simulator gets its own default.
                timeout = SIM_STATE_TIMEOUT_S if state_timeout_s is None else state_timeout_s
                with FrankyArm(FrankyConfig(sim.host, dynamics_factor=dynamics, gripper=gripper,
                                            state_timeout_s=timeout, release_at_exit=release_at_exit)) as arm:
                    yield arm
    else:
        raise ValueError(f"--robot {spec!r}: expected franka:IP, sim or sim:HOST")
