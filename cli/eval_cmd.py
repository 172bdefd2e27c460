"""`molmoact-edge eval`: task success of a policy in the rendered tabletop, over seeded episodes.

    molmoact-edge eval --bundle BUNDLE --episodes 20 --seed 1000 [--policy molmoact|expert] [--json]

Episode i uses seed S+i (scene layout and instruction "move to the <colour> <shape>"); each runs the
real closed loop: franky-sim with the scene in its physics, the rendered camera, the inference
worker, executor and safety, franky. Success: the end effector within 3 cm of the point 10 cm above
the named object within the time limit. `--policy expert` is the privileged scripted reference (it
is given the goal; sim only). Seeds below 1000 are the demo policy's training seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from molmoact_edge.argtypes import non_negative_int, positive_float, positive_int
from molmoact_edge.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", choices=["molmoact", "expert"], default="molmoact",
                   help="molmoact: the bundle's model; expert: the privileged scripted reference (sim only)")
    p.add_argument("--bundle", default=None, help="MolmoAct bundle directory (for --policy molmoact)")
    p.add_argument("--unnorm-key", default=None, help="the bundle's dataset statistics/convention (default: its only one)")
    p.add_argument("--convention", default=None, help="action-convention preset instead of the unnorm key's own")
    p.add_argument("--episodes", type=positive_int, default=20)
    p.add_argument("--seed", type=non_negative_int, default=1000, help="first seed; episode i uses seed+i (>= 1000: never trained on)")
    p.add_argument("--limit", type=positive_float, default=30.0, help="simulated seconds per episode")
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--max-actions", type=positive_int, default=8)
    p.add_argument("--worker", choices=["thread", "process"], default=None,
                   help="where inference runs (default: process for molmoact, thread for expert)")
    p.add_argument("--gif-dir", type=Path, default=None, help="write an animated GIF of the first --gif-episodes here")
    p.add_argument("--gif-episodes", type=positive_int, default=1)
    p.add_argument("--trace-frames", type=positive_int, default=None, metavar="K",
                   help="instead of closed-loop episodes: run the bundle on K rendered frames per seed (poses on the "
                        "expert's path) and report how often the last trace point lies within 10%% of the image "
                        "width of the named object's projected centre")
    p.add_argument("--json", action="store_true", help="print one JSON object (success_rate, per-episode results)")


def _trace_accuracy(args, seeds: list[int]) -> int:
    import numpy as np
    from molmoact_edge.export.demo_data import heldout_frames
    from molmoact_edge.hardware.render_camera import SceneRenderer  # noqa: F401  (first: headless GL)
    from molmoact_edge.hardware.scene import camera_intrinsics
    from molmoact_edge.runtime.engine.parser import trace_to_pixels
    from molmoact_edge.runtime.engine.pipeline import open_bundle

    intr = camera_intrinsics()
    rows = []
    with open_bundle(args.bundle) as pipe:
        for rgb, instruction, obj_px, _ in heldout_frames(seeds, args.trace_frames):
            res = pipe.act([rgb], instruction, max_new_tokens=args.max_new_tokens, max_actions=args.max_actions,
                           unnorm_key=args.unnorm_key)
            err = None
            if res.trace:
                last = trace_to_pixels(res.trace, intr.width, intr.height)[-1]
                err = float(np.linalg.norm(last - obj_px)) / intr.width
            rows.append({"instruction": instruction, "trace": res.trace, "error_fraction_of_width": err,
                         "hit": err is not None and err <= 0.1, "parse_errors": res.parse_errors})
    hit = sum(r["hit"] for r in rows) / len(rows)
    d = {"bundle": args.bundle, "frames": len(rows), "trace_hit_rate": hit, "per_frame": rows}
    print(json.dumps(d) if args.json else f"last trace point within 10% of the image width of the named object: "
          f"{sum(r['hit'] for r in rows)}/{len(rows)} ({100 * hit:.0f}%)")
    return 0


def run(args: argparse.Namespace) -> int:
    from molmoact_edge.stop_signals import StopSignals

    with StopSignals():  # SIGTERM takes Ctrl-C's stop path; the exit after either has a deadline
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from molmoact_edge.runtime.control.evaluate import EvalConfig, describe_decode, evaluate, expert_spec
    from molmoact_edge.runtime.control.policy import PolicySpec

    if args.policy == "molmoact":
        if not args.bundle:
            raise UsageError("--policy molmoact needs --bundle BUNDLE (or use --policy expert)")
        from molmoact_edge.run_cmd import _check_molmoact

        options = {"bundle": args.bundle, "unnorm_key": args.unnorm_key, "convention": args.convention,
                   "max_new_tokens": args.max_new_tokens, "max_actions": args.max_actions}
        _check_molmoact(options)  # a bad bundle, key or convention fails before any simulator starts

        def spec_for(scene):
            return PolicySpec(kind="molmoact", options=options)
    else:
        if args.bundle:
            raise UsageError("--bundle is for --policy molmoact; the expert needs none")
        spec_for = expert_spec
    try:
        config = EvalConfig(limit_s=args.limit, worker=args.worker or ("process" if args.policy == "molmoact" else "thread"))
    except ValueError as e:
        raise UsageError(str(e)) from e
    seeds = [args.seed + i for i in range(args.episodes)]
    if args.trace_frames is not None:
        if args.policy != "molmoact":
            raise UsageError("--trace-frames measures a bundle's traces; use it with --policy molmoact --bundle B")
        if args.seed < 1000:
            raise UsageError("--trace-frames uses held-out scenes: --seed must be >= 1000")
        return _trace_accuracy(args, seeds)
    # Progress goes to stderr also with --json (stdout then holds only the JSON object), so a long
    # evaluation shows each episode as it ends.
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    if args.seed < 1000:
        say(f"note: seeds below 1000 are the demo policy's training seeds (first seed {args.seed})")

    def on_episode(ep):
        what = f"success in {ep.time_to_success_s:.1f} s (simulated; {ep.wall_time_to_success_s:.1f} s host)" if ep.success else \
            f"failed ({ep.fault})" if ep.reason == "error" else \
            f"failed ({ep.fault or ep.reason}; closest {100 * ep.min_distance_m:.1f} cm)"
        lat = ep.to_dict()["step_latency_ms"]["median"]
        say(f"seed {ep.seed}: {ep.instruction!r}: {what}, {ep.steps} steps, median step latency "
            f"{'-' if lat is None else f'{lat:.0f} ms'}" + (f", gif {ep.gif}" if ep.gif else ""))

    report = evaluate(seeds, spec_for, args.policy if args.policy == "expert" else f"molmoact:{args.bundle}",
                      config, gif_dir=args.gif_dir, gif_episodes=args.gif_episodes, on_episode=on_episode)
    d = report.to_dict()
    if args.json:
        print(json.dumps(d))
    else:
        ran = [e.seed for e in report.episodes]
        print(f"{d['policy']}: success {d['successes']}/{d['episodes']} ({100 * d['success_rate']:.0f}%), seeds "
              f"{ran[0]}-{ran[-1]}; median time to success {d['time_to_success_s_median']} s, median steps "
              f"{d['steps_median']}, median step latency {d['step_latency_ms_median']} ms")
        if d["decode"]:
            print(f"decoding: {describe_decode(d['decode'])}")
    if report.stopped == "interrupted":
        say(f"interrupted after {len(report.episodes)} of {len(seeds)} episodes (the arm was stopped); the "
            "report covers those")
        return 130
    if report.stopped:
        say(f"error: the evaluation stopped after {len(report.episodes)} of {len(seeds)} episodes: {report.stopped}. "
            "Check that franky-sim, MuJoCo's headless GL and the bundle work (`molmoact-edge eval --policy expert "
            "--episodes 1`), and that the CPU is not starved")
        return 1
    return 0
