"""The run log (JSONL, one record per event) and the live console status line.

Every observation sent to the policy, every chunk received, every command and gripper command sent
to the arm, every safety intervention, fault and stop is one JSON line with host-clock timestamps,
so that a run can be audited afterwards (the fault-injection tests assert on exactly this file).
"""

from __future__ import annotations

import json
import sys
from collections import deque
from pathlib import Path
from typing import IO

import numpy as np


def _plain(v):
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return round(f, 6) if np.isfinite(f) else str(f)  # JSON has no NaN; keep it visible
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class RunLog:
    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._f: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w", buffering=1)  # line-buffered: a crash loses at most one line

    def write(self, kind: str, t: float, **fields) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({"kind": kind, "t": round(t, 6), **_plain(fields)}) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_log(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Status:
    """Counters for the console line: loop rate, inference latency, last action, interventions."""

    def __init__(self, stream: IO[str] | None = sys.stderr, interval_s: float = 1.0) -> None:
        self.stream = stream
        self.interval_s = interval_s
        self.tick_times: deque[float] = deque(maxlen=200)
        self.latency_s: float | None = None
        self.last_action: list[float] | None = None
        self.interventions: dict[str, int] = {}
        self.chunks = 0
        self.commands = 0
        self.overruns = 0
        self._last_print = -1e9

    def tick(self, t: float) -> None:
        self.tick_times.append(t)

    @property
    def rate_hz(self) -> float:
        if len(self.tick_times) < 2:
            return 0.0
        span = self.tick_times[-1] - self.tick_times[0]
        return (len(self.tick_times) - 1) / span if span > 0 else 0.0

    def intervene(self, what: str) -> None:
        self.interventions[what] = self.interventions.get(what, 0) + 1

    def line(self, pose=None) -> str:
        lat = "-" if self.latency_s is None else f"{self.latency_s * 1000:.0f} ms"
        act = "-" if self.last_action is None else "[" + " ".join(f"{v:+.3f}" for v in self.last_action) + "]"
        iv = ", ".join(f"{k} {v}" for k, v in sorted(self.interventions.items())) or "none"
        pos = "" if pose is None else " | ee [" + " ".join(f"{v:.3f}" for v in pose.position) + "]"
        return (f"rate {self.rate_hz:5.1f} Hz | inference {lat} | chunks {self.chunks} | commands {self.commands} | "
                f"overruns {self.overruns} | last action {act} | safety: {iv}{pos}")

    def maybe_print(self, t: float, pose=None) -> None:
        if self.stream is not None and t - self._last_print >= self.interval_s:
            self._last_print = t
            print(self.line(pose), file=self.stream, flush=True)
