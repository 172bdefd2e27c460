"""The arm contract: read the end-effector pose, stream absolute Cartesian targets, stop.

Targets are absolute poses in the robot base frame. `move_to` never blocks on the motion: each call
replaces the previous target and the arm's own controller (franky's C++ side at 1 kHz) plans a
smooth, limit-respecting path to it. A control loop therefore streams targets at its own rate and
never sees the 1 kHz loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .geometry import Pose


class ArmError(RuntimeError):
    """The arm cannot be reached or refused a command; the message names the problem and the fix."""


@dataclass(frozen=True)
class ArmState:
    """A snapshot of the arm.

    host_time: host clock when this state was received. robot_time_s: the controller's own clock
    (None when the arm has none); a robot clock that stops advancing means the connection is dead.
    error: None when healthy, otherwise why the arm must not be commanded.
    """

    pose: Pose
    host_time: float
    robot_time_s: float | None = None
    error: str | None = None
    gripper_width: float | None = None


@runtime_checkable
class Arm(Protocol):
    name: str

    def connect(self) -> Arm: ...

    def close(self) -> None: ...

    def __enter__(self) -> Arm: ...

    def __exit__(self, *exc) -> None: ...

    def state(self) -> ArmState:
        """The latest state; never blocks on the network."""
        ...

    def move_to(self, target: Pose) -> None:
        """Start moving to an absolute base-frame pose, replacing any running target; returns at once."""
        ...

    def stop(self) -> bool:
        """Stop the current motion (the arm holds position); True when the stop reached the arm's
        client library. Never raises: a failed stop is logged and reported through state().error;
        the controller's own reflexes and the hardware emergency stop remain the last line of defence."""
        ...

    def set_gripper(self, closed: bool) -> None:
        """Open or close the gripper asynchronously."""
        ...

    def recover(self) -> bool:
        """Clear a recoverable error (reflex) so that motions can be commanded again."""
        ...
