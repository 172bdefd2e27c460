"""The policy contract: an observation in, an action chunk stamped with the observation time out.

A policy runs inside an `InferenceWorker` (a thread or a separate process), so what crosses the
boundary is plain data: an `Observation` (frames, instruction, the arm pose at observation time)
and an `ActionChunk` (N x 7 actions in the policy's `ActionConvention`). Policies are built from a
picklable `PolicySpec` so that a worker process can construct its own copy.

The MolmoAct policy (runtime/molmoact_policy.py, the bridge to the engine) is the "molmoact" kind;
its options travel in `PolicySpec.options` as plain data. `runtime/control/factory.py` builds any
kind from its spec.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from molmoact_edge.hardware.camera import Frame
from molmoact_edge.hardware.geometry import Pose
from molmoact_edge.runtime.control.convention import ActionConvention


@dataclass(frozen=True)
class Observation:
    frames: tuple[Frame, ...]  # one per camera, primary first
    instruction: str
    timestamp: float  # host clock of the oldest frame: the moment the observation describes
    pose: Pose  # end-effector pose at `timestamp` (the anchor of the chunk's deltas)
    index: int = 0


@dataclass(frozen=True)
class ActionChunk:
    actions: np.ndarray  # (N, 7) in the policy's convention
    observation_time: float
    observation_index: int
    anchor: Pose
    convention: ActionConvention
    finished_at: float = 0.0  # host clock when inference returned
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        a = np.asarray(self.actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != self.convention.action_dim or a.shape[0] == 0:
            raise ValueError(f"ActionChunk.actions must be (N>0, {self.convention.action_dim}), got {a.shape}")
        object.__setattr__(self, "actions", a)

    @property
    def finite(self) -> bool:
        return bool(np.all(np.isfinite(self.actions)))


@runtime_checkable
class Policy(Protocol):
    convention: ActionConvention

    def predict(self, obs: Observation) -> np.ndarray:
        """(N, 7) actions for this observation, in `self.convention`."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ScriptedConfig:
    """Bring-up policy: move the end effector by `offset` (base frame, metres) from where it starts,
    in steps of at most `step_m` per action, `chunk` actions per prediction; optionally close the
    gripper at the goal. `think_s` emulates inference latency: `think="sleep"` costs no CPU,
    "python" burns it in pure Python holding the GIL (a Python decode loop), "numpy" burns it in
    matrix products that release the GIL (an onnxruntime/TensorRT forward)."""

    offset: tuple[float, float, float] = (0.05, 0.0, 0.0)
    step_m: float = 0.01
    chunk: int = 8
    control_period_s: float = 0.1
    think_s: float = 0.0
    think: str = "sleep"
    close_gripper_at_goal: bool = False

    def __post_init__(self) -> None:
        if len(self.offset) != 3:
            raise ValueError(f"ScriptedConfig.offset must be (dx, dy, dz), got {self.offset}")
        if not (0.0 < self.step_m <= 0.05):
            raise ValueError(f"ScriptedConfig.step_m must be in (0, 0.05] m, got {self.step_m}")
        if not (1 <= self.chunk <= 64):
            raise ValueError(f"ScriptedConfig.chunk must be in [1, 64], got {self.chunk}")
        if self.think_s < 0:
            raise ValueError(f"ScriptedConfig.think_s must be >= 0, got {self.think_s}")
        if self.think not in ("sleep", "python", "numpy"):
            raise ValueError(f"ScriptedConfig.think must be one of sleep, python, numpy, got {self.think!r}")


class ScriptedPolicy:
    def __init__(self, config: ScriptedConfig = ScriptedConfig()) -> None:
        self.config = config
        self.convention = ActionConvention(control_period_s=config.control_period_s)
        self.goal: np.ndarray | None = None

    def predict(self, obs: Observation) -> np.ndarray:
        c = self.config
        if self.goal is None:
            self.goal = obs.pose.p + np.asarray(c.offset, dtype=np.float64)
        if c.think_s:
            _think(c.think, c.think_s)
        actions = np.zeros((c.chunk, 7))
        pos = obs.pose.p
        for k in range(c.chunk):
            d = self.goal - pos
            n = float(np.linalg.norm(d))
            step = d if n <= c.step_m else d / n * c.step_m
            pos = pos + step
            actions[k, :3] = step
            at_goal = float(np.linalg.norm(self.goal - pos)) < 1e-4
            actions[k, 6] = 0.0 if (c.close_gripper_at_goal and at_goal) else 1.0
        return actions

    def close(self) -> None:
        pass


def _think(kind: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    if kind == "sleep":
        time.sleep(seconds)
    elif kind == "python":
        x = 0
        while time.monotonic() < end:
            for i in range(1000):
                x += i * i
    else:
        a = np.random.default_rng(0).standard_normal((384, 384)).astype(np.float32)
        while time.monotonic() < end:
            a = np.tanh(a @ a * 1e-3)


@dataclass(frozen=True)
class FaultDrill:
    """Deliberate faults for drills and tests, applied on top of a working policy.

    On prediction number `at` (0-based): "raise" raises, "nan" returns NaNs, "far" returns a
    0.5 m jump (beyond any sane workspace), "slow" sleeps `delay_s` before answering (a late chunk),
    "hang" never answers (a stuck model).
    """

    kind: str = "none"
    at: int = 1
    delay_s: float = 1.0

    KINDS = ("none", "raise", "nan", "far", "slow", "hang")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"FaultDrill.kind must be one of {self.KINDS}, got {self.kind!r}")
        if self.at < 0:
            raise ValueError(f"FaultDrill.at must be >= 0, got {self.at}")


class DrillPolicy:
    def __init__(self, inner: Policy, drill: FaultDrill) -> None:
        self.inner = inner
        self.drill = drill
        self.convention = inner.convention
        self.calls = 0

    def predict(self, obs: Observation) -> np.ndarray:
        n = self.calls
        self.calls += 1
        actions = self.inner.predict(obs)
        if n != self.drill.at:
            return actions
        kind = self.drill.kind
        if kind == "raise":
            raise RuntimeError(f"fault drill: policy raised on prediction {n}")
        if kind == "nan":
            actions = actions.copy()
            actions[len(actions) // 2, 1] = np.nan
        elif kind == "far":
            actions = actions.copy()
            actions[0, :3] = [0.5, 0.5, -0.5]
        elif kind == "slow":
            time.sleep(self.drill.delay_s)
        elif kind == "hang":
            time.sleep(3600)
        return actions

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class PolicySpec:
    """A picklable recipe for a policy, so a worker process can build its own."""

    kind: str = "scripted"
    scripted: ScriptedConfig = ScriptedConfig()
    drill: FaultDrill = FaultDrill()
    options: dict[str, Any] = field(default_factory=dict)

    KINDS = ("scripted", "molmoact", "expert")  # expert: sim-only, privileged (runtime/control/expert.py)

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"PolicySpec.kind must be one of {self.KINDS}, got {self.kind!r}")


class PolicyUnavailable(RuntimeError):
    pass
