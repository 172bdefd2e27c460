"""Speculative decoding on consecutive frames: sequential LLM forwards per emitted token and ms per
step with and without drafts, on onnxruntime CPU, and the cost of a k-token verification forward.

Frames: the synthetic table-top scene (export/tiny.py) with the gripper moving a few pixels per
frame, one grammar-constrained step per frame (the control loop's setting). Each step is decoded
three ways on the same bundle: plain, drafted from the previous frame's answer (what the MolmoAct
policy does), and that plus n-gram lookups within the answer. The ids must be identical (checked).

Verify-cost curve: one forward of k tokens against one of a single token at the same position,
k = 1..16, median of ``--repeats`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from molmoact_edge.export.onnx_export import export_bundle
from molmoact_edge.export.tiny import synthetic_scene, write_checkpoint
from molmoact_edge.runtime.engine.generate import generate
from molmoact_edge.runtime.engine.pipeline import open_bundle

INSTRUCTION = "put the red block in the blue bowl"
MODES = ("plain", "previous", "previous+ngram")


def frames(n: int, size: int = 256, step_px: int = 3) -> list[np.ndarray]:
    """A moving gripper over a fixed scene: a grey bar that slides ``step_px`` pixels per frame."""
    base = synthetic_scene(size, size)
    out = []
    for i in range(n):
        img = base.copy()
        x0 = int(0.30 * size) + i * step_px
        img[int(0.05 * size):int(0.40 * size), x0:x0 + int(0.06 * size)] = (150, 150, 160)
        out.append(img)
    return out


def _say(text: str) -> None:
    print(text, flush=True, file=sys.stderr)


def bundle_for(workdir: Path, size: str, seed: int = 0) -> Path:
    ckpt, bundle = workdir / f"checkpoint-{size}", workdir / f"bundle-{size}"
    if not (ckpt / "model.safetensors").exists():
        _say(f"writing the random '{size}' checkpoint to {ckpt}")
        write_checkpoint(ckpt, size, seed)
    if not (bundle / "manifest.json").exists():
        _say(f"exporting it to {bundle} (once; reused by later runs)")
        export_bundle(ckpt, bundle, progress=lambda s: None)
    return bundle


def consecutive_steps(pipe, n_frames: int, max_new_tokens: int, max_actions: int) -> dict:
    grammar = pipe.grammar(None, max_actions)
    eos = pipe.spec.tokenizer.special.eos
    rows = {m: [] for m in MODES}
    prev: list[int] | None = None
    for i, img in enumerate(frames(n_frames)):
        inputs = pipe.spec.inputs([img], INSTRUCTION, "single")
        ids = None
        for mode in MODES:
            drafter = None if mode == "plain" or prev is None else pipe.drafter(prev, ngram=mode.endswith("ngram"))
            if mode == "previous+ngram" and prev is None:
                drafter = pipe.drafter(None, ngram=True)
            r = generate(pipe.backend, inputs, eos, max_new_tokens, grammar_state=grammar.start(max_tokens=max_new_tokens),
                         drafter=drafter)
            if ids is None:
                ids = r.token_ids
            elif r.token_ids != ids:
                raise AssertionError(f"frame {i}: {mode} gave other ids than plain decoding")
            rows[mode].append({"frame": i, "new_tokens": len(r.token_ids), "forwards": r.forwards,
                               "decode_ms": r.timings_ms["decode"], "step_ms": r.timings_ms["total"],
                               "draft_tokens": r.drafts.draft_tokens, "accepted_tokens": r.drafts.accepted_tokens,
                               "segments": r.drafts.to_dict()})
        _say(f"frame {i}: {len(ids)} tokens, forwards " +
             ", ".join(f"{m} {rows[m][-1]['forwards']}" for m in MODES))
        prev = ids
    return rows


def verify_curve(pipe, ks=range(1, 17), repeats: int = 5, at: int = 100) -> dict[str, dict[int, float]]:
    """ms of one k-token forward (logits for all k rows, as verification asks) at position
    prompt + ``at``: median and minimum over ``repeats`` rounds in which every k runs once (on a
    shared machine the minimum is the better estimate of the forward's own cost)."""
    be = pipe.backend
    inputs = pipe.spec.inputs([frames(1)[0]], INSTRUCTION, "single")
    feats = be.vision(inputs.vision.crops, inputs.vision.pooled_patches_idx)
    start = len(inputs.input_ids) + at
    be.reset(start + max(ks) + 1)
    be.forward(inputs.input_ids, 0, image_features=feats)
    times: dict[int, list[float]] = {k: [] for k in ks}
    ids = np.full(max(ks), 1000, dtype=np.int64)
    for _ in range(repeats + 1):  # the first round warms up
        for k in ks:
            t = time.perf_counter()
            be.forward(ids[:k], start, logits_rows=np.arange(k))
            times[k].append((time.perf_counter() - t) * 1e3)
    return {"median": {k: float(np.median(v[1:])) for k, v in times.items()},
            "min": {k: float(np.min(v[1:])) for k, v in times.items()}}


def summary(rows: dict) -> dict:
    out = {}
    for mode, rs in rows.items():
        later = rs[1:] or rs  # the first frame has no previous answer
        tokens = sum(r["new_tokens"] for r in later)
        out[mode] = {"forwards_per_token": sum(r["forwards"] for r in later) / tokens,
                     "ms_per_step": float(np.median([r["step_ms"] for r in later])),
                     "decode_ms_per_step": float(np.median([r["decode_ms"] for r in later])),
                     "acceptance": (sum(r["accepted_tokens"] for r in later) /
                                    max(1, sum(r["draft_tokens"] for r in later))),
                     "by_segment": {k: {"draft": sum(r["segments"][k]["draft_tokens"] for r in later),
                                        "accepted": sum(r["segments"][k]["accepted_tokens"] for r in later)}
                                    for k in later[0]["segments"]}}
    return out


def markdown(report: dict) -> str:
    head = (f"model `{report['model']}`, {report['frames']} consecutive frames (medians and totals over frames "
            f"2..{report['frames']}), onnxruntime CPU, {report['threads'] or 'default'} threads, load "
            f"{report['load_avg']:.1f} at start")
    lines = [head, "",
             "| decoding | forwards / token | ms / step | decode ms / step | drafted tokens accepted |",
             "|---|---|---|---|---|"]
    for mode, s in report["summary"].items():
        acc = "-" if mode == "plain" else f"{s['acceptance']:.0%}"
        lines.append(f"| {mode} | {s['forwards_per_token']:.3f} | {s['ms_per_step']:.0f} | "
                     f"{s['decode_ms_per_step']:.0f} | {acc} |")
    seg = report["summary"]["previous"]["by_segment"]
    lines += ["", "previous-answer drafts by segment: " + ", ".join(
        f"{k} {v['accepted']}/{v['draft']}" for k, v in seg.items()), "",
        "| k | " + " | ".join(str(k) for k in report["verify_ms"]["min"]) + " |",
        "|---|" + "---|" * len(report["verify_ms"]["min"])]
    for stat in ("min", "median"):
        ms = report["verify_ms"][stat]
        lines += [f"| {stat} ms | " + " | ".join(f"{v:.1f}" for v in ms.values()) + " |",
                  f"| {stat} x 1-token | " + " | ".join(f"{v / ms[1]:.2f}" for v in ms.values()) + " |"]
    return "\n".join(lines)


def run(workdir: Path, size: str, n_frames: int, max_new_tokens: int, max_actions: int, repeats: int,
        threads: int | None) -> dict:
    bundle = bundle_for(workdir, size)
    load = os.getloadavg()[0]
    with open_bundle(bundle, threads=threads) as pipe:
        rows = consecutive_steps(pipe, n_frames, max_new_tokens, max_actions)
        curve = verify_curve(pipe, repeats=repeats)
    return {"model": size, "frames": n_frames, "threads": threads, "load_avg": load, "rows": rows,
            "summary": summary(rows), "verify_ms": curve,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("bench-work"), help="checkpoint/bundle cache directory")
    p.add_argument("--size", default="bench", choices=["tiny", "bench"], help="random model preset")
    p.add_argument("--frames", type=int, default=6, help="consecutive frames")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-actions", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="rounds of the verify-cost curve")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--json", type=Path, default=None, help="also write the full report here")
    args = p.parse_args(argv)
    if args.frames < 2:
        p.error("--frames must be >= 2 (the first frame has no previous answer)")
    report = run(args.workdir, args.size, args.frames, args.max_new_tokens, args.max_actions, args.repeats,
                 args.threads)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
