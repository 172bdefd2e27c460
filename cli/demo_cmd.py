"""``molmoact-edge demo``: the trained demo policy acting in the rendered tabletop, offline.

Expands the policy shipped with the package (a small MolmoAct trained here on the scripted expert's
episodes: official checkpoint layout, real Qwen2 tokenizer) into a checkpoint, exports it to a bundle
and runs one closed-loop episode of "move to the <colour> <shape>" (`molmoact-edge eval`'s episode):
franky-sim with the seeded scene in its physics, the rendered scene camera, the bundle on onnxruntime
with the output grammar in an inference worker, the executor and safety, franky. It ends with whether
the arm reached the named object and where the GIF of the episode went. Nothing is downloaded; no
GPU, camera or robot is needed.

`--random` runs the older one-step demo instead: a random tiny checkpoint, one step on a synthetic
image, streaming depth, trace and action as they complete, with each stage's time (the values mean
nothing; every stage and the answer format are real).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from molmoact_edge.argtypes import float_in, instruction, non_negative_int, positive_int
from molmoact_edge.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="keep the demo checkpoint and bundle here (default: a temporary folder, removed at exit)")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help="scene seed (default 1000, a scene the policy never trained on); with --random: the "
                        "random checkpoint's seed (default 0)")
    p.add_argument("--gif", type=Path, default=None,
                   help="where the episode's GIF goes (default: molmoact-demo-SEED.gif in --out, or in the "
                        "current directory without --out)")
    p.add_argument("--limit", type=float_in(0.5, 600, "simulated seconds"), default=30.0,
                   help="simulated seconds for the episode (the task's limit is 30)")
    p.add_argument("--random", action="store_true",
                   help="instead: one step of a random tiny checkpoint on a synthetic image, stage by stage")
    p.add_argument("--size", choices=["tiny", "bench"], default="tiny", help="with --random: model size preset")
    p.add_argument("--instruction", type=instruction, default="put the red block in the blue bowl",
                   help="with --random: the instruction")
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    if args.seed is None:
        args.seed = 0 if args.random else 1000
    if args.random and args.gif is not None:
        raise UsageError("--gif is for the closed-loop episode; --random runs one step and writes no video")
    if not args.random:
        if args.gif is None:
            args.gif = (args.out or Path.cwd()) / f"molmoact-demo-{args.seed}.gif"
        # Checked first: an unwritable folder would otherwise fail only after export and the episode.
        folder = args.gif.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create {folder} for the episode's GIF ({e}): pass --gif PATH in a writable folder") from e
        if not os.access(folder, os.W_OK):
            raise UsageError(f"cannot write the episode's GIF into {folder}: pass --gif PATH in a writable folder")
    step = _random_step if args.random else _episode
    if args.out is not None:
        return step(args)
    # Without --out the checkpoint and bundle (~70 MB random, ~320 MB trained) go to a temporary
    # folder that is removed at exit, so that repeated demos do not fill /tmp.
    with tempfile.TemporaryDirectory(prefix="molmoact-demo-") as tmp:
        args.out = Path(tmp)
        code = step(args)
        if not args.json:
            print(f"(removed the temporary checkpoint and bundle in {tmp}; pass --out DIR to keep them)", file=sys.stderr)
        return code


def _episode(args) -> int:
    from molmoact_edge.demo_policy_cmd import packaged_weights
    from molmoact_edge.stop_signals import StopSignals

    weights = packaged_weights()
    say = (lambda *a: None) if args.json else print
    # Named after the weights, so that a kept --out folder never serves an older policy's bundle.
    tag = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    ckpt, bundle = args.out / f"demo-policy-{tag}", args.out / f"bundle-{tag}"
    if not (ckpt / "model.safetensors").exists():
        from molmoact_edge.export.train_demo import expand_compact

        say(f"expanding the shipped demo policy ({weights.stat().st_size / 1e6:.1f} MB compact) into a checkpoint "
            f"(official layout) at {ckpt}")
        expand_compact(weights, ckpt)
    if not (bundle / "manifest.json").exists():
        from molmoact_edge.export.onnx_export import export_bundle

        say(f"exporting it to an onnxruntime bundle at {bundle}")
        export_bundle(ckpt, bundle, progress=say)

    from molmoact_edge.hardware.scene import HOVER_M, SUCCESS_RADIUS_M, Scene
    from molmoact_edge.runtime.control.evaluate import EvalConfig, decode_summary, describe_decode, run_episode
    from molmoact_edge.runtime.control.policy import PolicySpec

    scene = Scene.from_seed(args.seed, EvalConfig.n_objects)
    say(f"closed loop on scene {args.seed}: {scene.instruction!r} (franky-sim, rendered camera, the bundle on "
        f"onnxruntime in an inference worker; success: the end effector within {100 * SUCCESS_RADIUS_M:.0f} cm "
        f"of the point {100 * HOVER_M:.0f} cm above the object within {args.limit:g} simulated s)")
    spec = PolicySpec(kind="molmoact", options={"bundle": str(bundle), "max_new_tokens": args.max_new_tokens})
    with StopSignals():  # Ctrl-C or SIGTERM stops the arm first
        ep = run_episode(args.seed, lambda _: spec, EvalConfig(limit_s=args.limit, worker="process"), args.gif)
    d = ep.to_dict()
    d.update(checkpoint=str(ckpt), bundle=str(bundle))
    if args.json:
        print(json.dumps(d))
        return 0
    lat = d["step_latency_ms"]["median"]
    if ep.success:
        print(f"success   : reached the {scene.target_object.name} in {ep.time_to_success_s:.1f} s simulated "
              f"({ep.wall_time_to_success_s:.1f} s on this machine)")
    else:
        print(f"no success: {ep.fault or ep.reason}; closest {100 * ep.min_distance_m:.1f} cm from the goal")
    print(f"steps     : {ep.steps} policy answers, median step latency {'-' if lat is None else f'{lat:.0f} ms'}")
    if ep.decode:
        print(f"decoding  : {describe_decode(decode_summary(ep.decode))}")
    print(f"video     : {ep.gif or 'none (no frame was rendered)'}")
    return 0


def _random_step(args) -> int:
    from molmoact_edge.export.onnx_export import export_bundle
    from molmoact_edge.export.tiny import synthetic_scene, write_checkpoint
    from molmoact_edge.runtime.engine.parser import trace_to_pixels
    from molmoact_edge.runtime.engine.pipeline import open_bundle
    from PIL import Image

    say = (lambda *a: None) if args.json else print
    root = args.out
    ckpt = root / f"checkpoint-{args.size}-seed{args.seed}"
    bundle = root / f"bundle-{args.size}-seed{args.seed}"
    if not (ckpt / "model.safetensors").exists():
        say(f"writing a random MolmoAct checkpoint (official layout) to {ckpt}")
        write_checkpoint(ckpt, args.size, args.seed)
    if not (bundle / "manifest.json").exists():
        say(f"exporting it to an onnxruntime bundle at {bundle}")
        export_bundle(ckpt, bundle, progress=say)
    image = synthetic_scene()
    Image.fromarray(image).save(root / "scene.png")

    def on_event(timed):
        e, t_ms = timed.to_dict(), timed.t_ms
        if e["type"] == "trace":
            px = trace_to_pixels(e["points"], image.shape[1], image.shape[0]).round(1).tolist()
            say(f"  {t_ms:7.1f} ms  trace ready: {e['points']} (pixels {px})")
        elif e["type"] == "depth":
            say(f"  {t_ms:7.1f} ms  depth map ready: {len(e['codes'])} codes")
        elif e["type"] == "action":
            say(f"  {t_ms:7.1f} ms  action {e['index']}: {[round(v, 4) for v in e['values'] or e['normalized']]}")

    say(f"running one step on {root / 'scene.png'} with the bundle on onnxruntime (grammar-constrained):")
    with open_bundle(bundle) as pipe:
        res = pipe.act([image], args.instruction, max_new_tokens=args.max_new_tokens, max_actions=1,
                       on_event=on_event)
    d = res.to_dict()
    d.update(checkpoint=str(ckpt), bundle=str(bundle))
    if args.json:
        print(json.dumps(d, ensure_ascii=False))
        return 0
    t = d["timings_ms"]
    print(f"prompt     : {d['prompt_tokens']} tokens ({res.inputs.n_image_tokens} image tokens, template {d['template']})")
    print(f"generated  : {d['new_tokens']} tokens in {res.forwards} LLM forwards ({res.forced_tokens} forced by the "
          f"grammar), stopped on {d['stopped']}")
    print(f"answer ok  : {res.parsed.ok} {res.parse_errors or ''}")
    print("timings ms : " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + f"  ({d['tokens_per_s']} tok/s)")
    print("(random weights: the values mean nothing; every stage and the answer format are real)")
    return 0
