"""``molmoact-edge demo``: the whole pipeline offline, on a tiny random checkpoint.

Builds a random MolmoAct checkpoint in the official layout (real tokenizer, real image geometry,
tiny widths), exports it to a bundle, draws a synthetic camera image and runs one control step on
the bundle with onnxruntime and the output grammar, streaming depth, trace and action as they
complete. Nothing is downloaded; no GPU, camera or robot is needed. The values are meaningless
(random weights): the point is to show every stage working and how long each takes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from molmoact_edge.argtypes import instruction, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="keep the demo checkpoint and bundle here (default: a temporary folder, removed at exit)")
    p.add_argument("--size", choices=["tiny", "bench"], default="tiny", help="random model size preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instruction", type=instruction, default="put the red block in the blue bowl")
    p.add_argument("--max-new-tokens", type=positive_int, default=400)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    if args.out is not None:
        return _run(args)
    # Without --out the demo's ~70 MB (checkpoint, bundle, scene) go to a temporary folder that is
    # removed at exit, so that repeated demos do not fill /tmp.
    with tempfile.TemporaryDirectory(prefix="molmoact-demo-") as tmp:
        args.out = Path(tmp)
        code = _run(args)
        if not args.json:
            print(f"(removed the temporary demo files in {tmp}; pass --out DIR to keep them)", file=sys.stderr)
        return code


def _run(args) -> int:
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
