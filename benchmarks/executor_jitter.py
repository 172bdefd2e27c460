"""Executor period error at 50 Hz while a CPU-heavy inference stand-in runs: thread vs process.

The full robot-side stack runs: a replay camera (capture thread), franky-sim (MuJoCo at 1 kHz in a
subprocess, standing in for the robot), the franky client with its state monitor, and the control
loop streaming targets. The policy is the scripted one with `think_s` of busy inference per chunk,
asked for continuously, so inference never pauses:
- python: pure-Python arithmetic holding the GIL (a Python decode loop, tokeniser, grammar);
- numpy: float32 matrix products that release the GIL (an onnxruntime/TensorRT forward).
Period error = (time between consecutive tick starts) - period.

    python -m molmoact_edge.benchmarks.executor_jitter [--seconds 10] [--rate 50]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np


def _folder(path: Path) -> Path:
    from molmoact_edge.hardware.camera import Intrinsics
    from molmoact_edge.hardware.recording import FolderWriter

    rng = np.random.default_rng(0)
    intr = Intrinsics(320, 240, 250.0, 250.0, 160.0, 120.0)
    with FolderWriter(path, intr) as w:
        for i in range(10):
            w.write(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8),
                    rng.integers(0, 5000, (240, 320), dtype=np.uint16), i / 30)
    return path


def measure(host: str, frames: Path, mode: str, think: str, seconds: float, rate: float, think_s: float,
            nice: int = 10) -> dict:
    from molmoact_edge.hardware.franky_arm import FrankyArm, FrankyConfig
    from molmoact_edge.hardware.replay import ReplayConfig, open_replay
    from molmoact_edge.runtime.control.loop import ControlLoop, LoopConfig
    from molmoact_edge.runtime.control.policy import PolicySpec, ScriptedConfig
    from molmoact_edge.runtime.control.safety import SafetyConfig
    from molmoact_edge.runtime.control.worker import WorkerConfig

    # A small back-and-forth motion so that targets stream the whole time.
    spec = PolicySpec(scripted=ScriptedConfig(offset=(0.0, 0.0, 0.0), think_s=think_s if think != "none" else 0.0,
                                              think=think if think != "none" else "sleep"))
    cfg = LoopConfig(rate_hz=rate, safety=SafetyConfig(dynamics_factor=0.2), worker=WorkerConfig(mode=mode, nice=nice),
                     replan_when_remaining_s=1e9, max_duration_s=seconds, status_interval_s=1e9)
    with open_replay(ReplayConfig(str(frames))) as cam, FrankyArm(FrankyConfig(host, dynamics_factor=0.2)) as arm:
        cam.wait_first_frame()
        with ControlLoop([cam], arm, spec, cfg, status_stream=None) as loop:
            result = loop.run()
            starts = np.asarray(loop.tick_starts)
    err = np.abs(np.diff(starts) - 1.0 / rate) * 1000.0
    return {"mode": mode if mode == "thread" else f"process (nice {nice})", "inference": think, "ticks": len(starts), "chunks": result.chunks,
            "mean_ms": float(err.mean()), "p99_ms": float(np.percentile(err, 99)), "max_ms": float(err.max()),
            "overruns": int(np.sum(err > 1000.0 / rate)), "fault": None if result.fault is None else result.fault.kind}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--think", type=float, default=0.5, help="seconds of busy inference per chunk")
    args = ap.parse_args(argv)
    from molmoact_edge.hardware.sim import SimServer

    rows = []
    with tempfile.TemporaryDirectory() as tmp, SimServer() as sim:
        frames = _folder(Path(tmp) / "frames")
        for think, mode, nice in [("none", "thread", 0), ("python", "thread", 0), ("python", "process", 0),
                                  ("python", "process", 10), ("numpy", "thread", 0), ("numpy", "process", 0),
                                  ("numpy", "process", 10)]:
            rows.append(measure(sim.host, frames, mode, think, args.seconds, args.rate, args.think, nice))
            r = rows[-1]
            print(f"{r['inference']:>7} {r['mode']:>8}: mean {r['mean_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                  f"max {r['max_ms']:.2f} ms  ({r['ticks']} ticks, {r['chunks']} chunks, fault {r['fault']})", flush=True)
    print(f"\n{args.rate:.0f} Hz executor, {args.seconds:.0f} s each, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"franky-sim running; inference stand-in busy {args.think:.1f} s per chunk, back to back\n")
    print("| inference stand-in | worker | period error mean (ms) | p99 (ms) | max (ms) | ticks late > 1 period |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['inference']} | {r['mode']} | {r['mean_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} | {r['overruns']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
