"""`molmoact-edge run`: close the loop between cameras, a policy and a Franka arm.

    molmoact-edge run --camera realsense[:SERIAL] | replay:PATH  (repeat for more cameras)
                      --robot franka:IP | sim[:HOST] --instruction TEXT
                      --policy scripted | --policy molmoact --bundle BUNDLE [--unnorm-key KEY]

`--robot sim` starts franky-sim (MuJoCo) for the run; `sim:HOST` uses one already running there.
Robot-side only: nothing here imports torch.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from functools import partial
from pathlib import Path

from molmoact_edge.argtypes import device_spec, float_in, instruction, positive_float, positive_int
from molmoact_edge.errors import UsageError
from molmoact_edge.stop_signals import StopSignals


def _reach(text: str) -> float | None:
    """--max-reach: metres in [0.2, 1.5], or 'off'."""
    if text.strip().lower() == "off":
        return None
    return float_in(0.2, 1.5, "metres")(text)


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers, got {text!r}") from None
    if len(vals) != n:
        raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--camera", action="append", required=True, metavar="SPEC",
                   type=device_spec({"realsense": "", "replay": "PATH"}),
                   help="realsense | realsense:SERIAL | replay:PATH (.db3 recording or image folder); repeat for several")
    p.add_argument("--robot", required=True, metavar="SPEC", type=device_spec({"franka": "IP", "sim": ""}), help="franka:IP | sim (start franky-sim) | sim:HOST (running franky-sim)")
    p.add_argument("--instruction", required=True, type=instruction, help="the task in words, e.g. 'put the cup in the sink'")
    p.add_argument("--policy", default="scripted", choices=["scripted", "molmoact"],
                   help="scripted: move by --scripted-offset (bring-up without a model); molmoact: the model, "
                        "from --bundle")
    p.add_argument("--bundle", default=None, help="MolmoAct bundle directory (molmoact-edge export) for --policy molmoact")
    p.add_argument("--bundle-sha256", default=None, metavar="HEX",
                   help="refuse the bundle unless sha256sum of its manifest.json is HEX (pins every file)")
    p.add_argument("--unnorm-key", default=None,
                   help="dataset statistics and action convention of the bundle's checkpoint (e.g. bridge_orig)")
    p.add_argument("--convention", default=None,
                   help="use this action-convention preset instead of the unnorm key's own (runtime/control/convention.py)")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="MolmoAct token budget per step")
    p.add_argument("--max-actions", type=positive_int, default=8, help="most action lists per MolmoAct answer")
    p.add_argument("--no-draft", action="store_true",
                   help="MolmoAct: do not draft each step from the previous answer (speculative decoding; the "
                        "answers are the same either way, drafting needs fewer sequential forwards)")
    p.add_argument("--rate", type=float, default=50.0, help="executor rate in Hz, 20-50")
    p.add_argument("--duration", type=positive_float, default=None, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--log", default=None, help="JSONL run log (default runs/run-<time>.jsonl)")
    p.add_argument("--worker", choices=["thread", "process"], default="process",
                   help="where inference runs (process keeps the executor on time, see README)")
    p.add_argument("--dynamics", type=float, default=0.1, help="franky relative dynamics factor")
    p.add_argument("--max-speed", type=positive_float, default=0.25, help="max commanded EE speed in m/s")
    p.add_argument("--workspace", default=None, metavar="XMIN,YMIN,ZMIN,XMAX,YMAX,ZMAX",
                   type=partial(_floats, n=6, what="--workspace"),
                   help="workspace box in the base frame, metres (default 0.25,-0.4,0.05,0.75,0.4,0.7)")
    # The limits that follow the measured arm (README, safety): the same ranges as SafetyConfig checks.
    p.add_argument("--max-lead", type=float_in(0.005, 0.5, "metres"), default=0.05, metavar="M",
                   help="most the commanded position may lead the measured one (a stuck arm holds the command back)")
    p.add_argument("--max-turn-lead", type=float_in(1.0, 180.0, "degrees"), default=20.0, metavar="DEG",
                   help="most the commanded orientation may lead the measured one")
    p.add_argument("--max-tilt", type=float_in(1.0, 180.0, "degrees"), default=45.0, metavar="DEG",
                   help="cone around the start pose's tool axis that the commanded tool axis stays in")
    p.add_argument("--max-reach", type=_reach, default=0.75, metavar="M|off",
                   help="the wrist (0.21 m behind the TCP along the tool axis) stays this close to the shoulder: "
                        "a Panda/FR3 is singular near 0.79 m; 'off' for another arm")
    p.add_argument("--box-margin", type=float_in(0.0, 0.5, "metres"), default=0.05, metavar="M",
                   help="stop when the measured position is this far outside the --workspace box")
    p.add_argument("--scripted-offset", default=(0.05, 0.0, 0.0), metavar="DX,DY,DZ",
                   type=partial(_floats, n=3, what="--scripted-offset"), help="scripted policy goal offset in metres")
    p.add_argument("--frame-timeout", type=positive_float, default=0.5, help="stop when the newest frame is older (s)")
    p.add_argument("--action-timeout", type=positive_float, default=60.0, help="stop when one inference takes longer (s)")
    p.add_argument("--state-timeout", type=float_in(0.005, 5.0, "seconds"), default=None, metavar="S",
                   help="stop when the controller's clock has not advanced for this long (a lost link); "
                        "default 0.1 s for a Franka, 0.5 s for franky-sim (a starved simulator's clock stalls)")
    p.add_argument("--no-gripper", action="store_true", help="the arm has no Franka Hand")
    p.add_argument("--record", default=None, metavar="PATH.db3", help="also record the (first) RealSense stream to this file")
    p.add_argument("-v", "--verbose", action="store_true")


def _check_molmoact(options: dict) -> None:
    """Cheap checks of the MolmoAct options in the main process (the worker loads the bundle itself):
    the bundle's manifest and config, the unnorm key and its action convention."""
    from molmoact_edge.runtime.control.convention import convention_for
    from molmoact_edge.runtime.engine.bundle import load_manifest
    from molmoact_edge.runtime.engine.config import ModelConfig
    from molmoact_edge.runtime.molmoact_policy import MolmoActConfig

    if not Path(options["bundle"]).is_dir():
        load_manifest(options["bundle"], verify_hashes=False)  # says how to make a bundle (exit 1)
    try:
        cfg = MolmoActConfig(**options)
    except ValueError as e:  # the token budget or action count
        raise UsageError(str(e)) from e
    manifest = load_manifest(cfg.bundle, verify_hashes=False, bundle_sha256=cfg.bundle_sha256)  # a bad bundle fails here (exit 1)
    config = ModelConfig.load(manifest.path)
    try:  # the key and convention are the user's choice among the bundle's: a usage error
        convention_for(cfg.convention or config.resolve_unnorm_key(cfg.unnorm_key))
    except ValueError as e:
        raise UsageError(str(e)) from e


# Stream no faster than this share of what the arm's planner may do, so that it keeps up with the target.
PLANNER_HEADROOM = 0.8


def _fit_to_arm(config, arm):
    """Lower the per-step speed limits to what the arm can follow at its dynamics factor.

    A target that outruns franky's planner leaves the arm behind (0.49 rad measured with the defaults,
    1 rad/s against 0.25 rad/s per axis at dynamics 0.1) and keeps the planner at its velocity limit,
    where every replaced motion starts."""
    from dataclasses import replace

    limits = getattr(arm, "speed_limits", None)
    s = config.safety
    if not limits:
        return config
    m, r = PLANNER_HEADROOM * limits[0], PLANNER_HEADROOM * limits[1]
    if s.max_speed_m_s <= m and s.max_rot_speed_rad_s <= r:
        return config
    fitted = replace(s, max_speed_m_s=min(s.max_speed_m_s, m), max_rot_speed_rad_s=min(s.max_rot_speed_rad_s, r))
    print(f"note: streaming at most {fitted.max_speed_m_s:.3f} m/s and {fitted.max_rot_speed_rad_s:.3f} rad/s, "
          f"{PLANNER_HEADROOM:.0%} of what {arm.name}'s planner allows at dynamics {s.dynamics_factor} "
          "(raise --dynamics for more)", file=sys.stderr)
    return replace(config, safety=fitted)


def run(args: argparse.Namespace) -> int:
    # `kill`, systemd and container stops send SIGTERM: it takes the Ctrl-C path (stop the arm, log the
    # stop and the end, join the worker), and from the first signal on the exit has a deadline.
    with StopSignals() as stops:
        return _run(args, stops)


def _run(args: argparse.Namespace, stops: StopSignals) -> int:
    from molmoact_edge.hardware.arm import ArmError
    from molmoact_edge.hardware.camera import CameraError, CameraSet
    from molmoact_edge.hardware.deps import MissingDependencyError
    from molmoact_edge.hardware.devices import open_camera, open_robot
    from molmoact_edge.runtime.control.executor import WatchdogConfig
    from molmoact_edge.runtime.control.loop import ControlLoop, LoopConfig
    from molmoact_edge.runtime.control.policy import (
        PolicySpec,
        PolicyUnavailable,
        ScriptedConfig,
    )
    from molmoact_edge.runtime.control.safety import SafetyConfig
    from molmoact_edge.runtime.control.worker import WorkerConfig

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log_path = args.log or str(Path("runs") / time.strftime("run-%Y%m%d-%H%M%S.jsonl"))
    try:  # the options' own checks (rates, limits, timeouts): a bad value is a usage error
        safety_kw = {"dynamics_factor": args.dynamics, "max_speed_m_s": args.max_speed, "max_lead_m": args.max_lead,
                     "max_lead_rad": math.radians(args.max_turn_lead), "max_tilt_rad": math.radians(args.max_tilt),
                     "box_margin_m": args.box_margin, "max_reach_m": args.max_reach}
        if args.workspace:
            safety_kw |= {"workspace_min": args.workspace[:3], "workspace_max": args.workspace[3:]}
        options = {}
        if args.bundle_sha256 is not None and args.policy != "molmoact":
            raise ValueError("--bundle-sha256 pins the bundle of --policy molmoact; drop it for --policy scripted")
        if args.policy == "molmoact":
            if not args.bundle:
                raise ValueError("--policy molmoact needs --bundle BUNDLE (create one with molmoact-edge export)")
            options = {"bundle": args.bundle, "bundle_sha256": args.bundle_sha256, "unnorm_key": args.unnorm_key,
                       "convention": args.convention,
                       "max_new_tokens": args.max_new_tokens, "max_actions": args.max_actions,
                       "draft": not args.no_draft}
        spec = PolicySpec(kind=args.policy, scripted=ScriptedConfig(offset=args.scripted_offset), options=options)
        config = LoopConfig(
            instruction=args.instruction, rate_hz=args.rate, safety=SafetyConfig(**safety_kw),
            watchdog=WatchdogConfig(frame_timeout_s=args.frame_timeout, action_timeout_s=args.action_timeout),
            worker=WorkerConfig(mode=args.worker), log_path=log_path, max_duration_s=args.duration,
        )
    except (ValueError, PolicyUnavailable) as e:
        raise UsageError(str(e)) from e
    if options:
        _check_molmoact(options)  # a bad bundle, key or convention fails before any hardware is touched
    try:
        cameras = [open_camera(s, args.record if i == 0 else None) for i, s in enumerate(args.camera)]
    except ValueError as e:  # a camera option the driver refuses (e.g. --record not ending in .db3)
        raise UsageError(str(e)) from e
    try:
        # the process ends after the run: franky's destructors (which can block in libfranka) never run
        robot = open_robot(args.robot, args.dynamics, not args.no_gripper, args.state_timeout, release_at_exit=True)
        with CameraSet(cameras), robot as arm:
            for cam in cameras:
                cam.wait_first_frame(5.0)
            config = _fit_to_arm(config, arm)
            with ControlLoop(cameras, arm, spec, config) as loop:
                print(f"running: {args.instruction!r} | {arm.name} | {', '.join(c.name for c in cameras)} | "
                      f"{config.rate_hz:.0f} Hz | log {log_path} | Ctrl-C stops the arm", file=sys.stderr)
                try:
                    result = loop.run()
                finally:
                    stops.arm_deadline()  # however the loop ended, closing everything is bounded too
    except (CameraError, ArmError, MissingDependencyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # during start-up, before the loop took over
        print("interrupted", file=sys.stderr)
        return 130
    print(f"finished: {result.reason}" + (f" ({result.fault.kind}: {result.fault.message})" if result.fault else "")
          + f"; {result.ticks} ticks, {result.commands} commands, {result.chunks} chunks"
          + (f", {result.planner_recoveries} planner failures recovered from" if result.planner_recoveries else "")
          + f"; log {log_path}", file=sys.stderr)
    return result.exit_code
