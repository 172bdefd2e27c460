"""The scripted expert for the simulated tabletop: PRIVILEGED, SIM-ONLY.

It is handed the goal point (from the scene it was seeded with, not from the camera) and moves the
end effector down (or up) to the goal's height and then across to it in base-frame steps (each axis
clipped), the gripper pointing down and open. It is the reference row of `molmoact-edge eval` and
the source of the demo policy's training episodes; it can never run on a real robot (nothing there
knows where the goal is).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from molmoact_edge.runtime.control.convention import convention_for
from molmoact_edge.runtime.control.policy import Observation

DEMO_UNNORM_KEY = "franka_tabletop_demo"


@dataclass(frozen=True)
class ExpertConfig:
    goal: tuple[float, float, float]  # base frame, metres
    step_m: float = 0.01  # most translation per axis and action (0.1 m/s per axis at 10 Hz: franky-sim keeps up on a busy CPU)
    chunk: int = 8

    def __post_init__(self) -> None:
        if len(self.goal) != 3 or not np.all(np.isfinite(self.goal)):
            raise ValueError(f"ExpertConfig.goal must be three finite numbers (metres, base frame), got {self.goal}")
        if not (0.0 < self.step_m <= 0.05):
            raise ValueError(f"ExpertConfig.step_m must be in (0, 0.05] m, got {self.step_m}")
        if not (1 <= self.chunk <= 64):
            raise ValueError(f"ExpertConfig.chunk must be in [1, 64], got {self.chunk}")


def expert_actions(position: np.ndarray, goal: np.ndarray, step_m: float, n: int) -> np.ndarray:
    """(n, 7) base-frame deltas from `position` to `goal`: first the height, then the horizontal
    (x and y stay put while z is more than one step from the goal's height); each axis clipped to at
    most `step_m` per action; no rotation; gripper open (1.0, the open_positive convention).

    Both choices make each axis's step a function the demo policy can read off the scene camera's
    image (README, "Session 7"). Clipped per axis, not scaled along the straight line: an axis's
    step depends on that axis's distance alone, not on a ratio of all three (trained on scaled
    steps, run rf answered nearly the same action for every frame). Height first: the camera looks
    down obliquely along x, so a hand nearer the camera and a lower hand move the same way in the
    image; at the goal's height (the same for every object) that ambiguity is gone, and whether to
    move in x is a comparison of the hand's and the object's image rows."""
    actions = np.zeros((n, 7))
    pos = np.asarray(position, float).copy()
    goal = np.asarray(goal, float)
    for k in range(n):
        step = np.clip(goal - pos, -step_m, step_m)
        if abs(goal[2] - pos[2]) > step_m:
            step[:2] = 0.0
        pos = pos + step
        actions[k, :3] = step
        actions[k, 6] = 1.0
    return actions


class ExpertPolicy:
    def __init__(self, config: ExpertConfig) -> None:
        self.config = config
        self.convention = convention_for(DEMO_UNNORM_KEY)

    def predict(self, obs: Observation) -> np.ndarray:
        c = self.config
        return expert_actions(obs.pose.p, np.asarray(c.goal, float), c.step_m, c.chunk)

    def close(self) -> None:
        pass
