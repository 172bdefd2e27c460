"""Worst-case time from a fault to the stop command, per fault kind, against franky-sim.

Latency is measured from the moment the fault became real to the return of `arm.stop()`:
- camera_stall: the newest frame's timestamp + the frame timeout (when the frame became too old);
- policy_error: when predict() raised (stamped in the worker);
- no_actions: when the running inference passed the action timeout;
- nonfinite_action: when the chunk holding NaN arrived;
- arm_error (sim killed): the SIGKILL of franky-sim; this one includes the detection time, i.e.
  the arm's state timeout (FrankyConfig.state_timeout_s, 100 ms by default);
- interrupted: the Ctrl-C (SIGINT delivered to the main thread).
Each scenario runs on a fresh simulator, `--repeat` times.

    python -m molmoact_edge.benchmarks.fault_stop_latency [--repeat 3] [--rate 50]
"""

from __future__ import annotations

import _thread
import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def run_once(kind: str, frames: Path, rate: float) -> float:
    from molmoact_edge.hardware.franky_arm import FrankyArm, FrankyConfig
    from molmoact_edge.hardware.replay import ReplayConfig, open_replay
    from molmoact_edge.hardware.sim import SimServer
    from molmoact_edge.runtime.control.executor import WatchdogConfig
    from molmoact_edge.runtime.control.loop import ControlLoop, LoopConfig
    from molmoact_edge.runtime.control.policy import (
        FaultDrill,
        PolicySpec,
        ScriptedConfig,
    )
    from molmoact_edge.runtime.control.runlog import read_log
    from molmoact_edge.runtime.control.safety import SafetyConfig
    from molmoact_edge.runtime.control.worker import WorkerConfig

    drill = {"policy_error": FaultDrill("raise", 1), "no_actions": FaultDrill("hang", 1),
             "nonfinite_action": FaultDrill("nan", 1)}.get(kind, FaultDrill())
    spec = PolicySpec(scripted=ScriptedConfig(offset=(0.0, 0.08, 0.0)), drill=drill)
    with tempfile.TemporaryDirectory() as tmp, SimServer() as sim:
        log = Path(tmp) / "run.jsonl"
        cfg = LoopConfig(rate_hz=rate, safety=SafetyConfig(dynamics_factor=0.2),
                         watchdog=WatchdogConfig(frame_timeout_s=0.2, action_timeout_s=0.5),
                         worker=WorkerConfig(mode="process" if kind == "no_actions" else "thread"),
                         log_path=str(log), max_duration_s=6.0, status_interval_s=1e9)
        source = frames / ("short" if kind == "camera_stall" else "loop")
        marks: dict = {}
        with open_replay(ReplayConfig(str(source), loop=kind != "camera_stall")) as cam, \
                FrankyArm(FrankyConfig(sim.host, dynamics_factor=0.2)) as arm:
            cam.wait_first_frame()
            with ControlLoop([cam], arm, spec, cfg, status_stream=None) as loop:
                def inject():
                    time.sleep(1.0)
                    marks["t"] = time.monotonic()
                    if kind == "arm_error":
                        sim.kill()
                    else:
                        _thread.interrupt_main()

                if kind in ("arm_error", "interrupted"):
                    threading.Thread(target=inject, daemon=True).start()
                loop.run()
        stops = [r for r in read_log(log) if r["kind"] == "stop" and r["fault"] == kind]
        if not stops:
            raise RuntimeError(f"{kind}: no stop recorded")
        s = stops[0]
        return s["t"] - marks["t"] if "t" in marks else s["latency_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rate", type=float, default=50.0)
    args = ap.parse_args(argv)
    from molmoact_edge.hardware.camera import Intrinsics
    from molmoact_edge.hardware.recording import FolderWriter

    kinds = ["camera_stall", "policy_error", "no_actions", "nonfinite_action", "interrupted", "arm_error"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        frames = Path(tmp)
        rng = np.random.default_rng(0)
        intr = Intrinsics(64, 48, 50.0, 50.0, 32.0, 24.0)
        for name, n in (("loop", 10), ("short", 45)):
            with FolderWriter(frames / name, intr) as w:
                for i in range(n):
                    w.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), None, i / 30)
        for kind in kinds:
            lat = [run_once(kind, frames, args.rate) for _ in range(args.repeat)]
            rows.append((kind, lat))
            print(f"{kind:>17}: " + ", ".join(f"{v * 1000:.1f}" for v in lat) + " ms", flush=True)
    period = 1000.0 / args.rate
    print(f"\n{args.rate:.0f} Hz executor (period {period:.0f} ms), {args.repeat} runs each\n")
    print("| fault | worst latency fault -> stop sent (ms) | median (ms) | within one period |")
    print("|---|---|---|---|")
    for kind, lat in rows:
        worst = max(lat) * 1000
        print(f"| {kind} | {worst:.1f} | {np.median(lat) * 1000:.1f} | {'yes' if worst <= period else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
