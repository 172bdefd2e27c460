"""``molmoact-edge demo``: the whole pipeline offline, on a tiny random checkpoint.

Builds a random MolmoAct checkpoint in the official layout (real tokenizer, real image geometry,
tiny widths), draws a synthetic camera image, and runs one control step on it. Nothing is
downloaded; no GPU, camera or robot is needed. The output is meaningless text (random weights): the
point is to show every stage working and how long each takes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="where to write the demo checkpoint (default: a temp dir)")
    p.add_argument("--size", choices=["tiny", "bench"], default="tiny", help="random model size preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instruction", default="put the red block in the blue bowl")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def synthetic_scene(height: int = 480, width: int = 640) -> np.ndarray:
    """A table-top stand-in: shaded background, a red block, a blue bowl, a gripper-ish bar."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([90 + 60 * x / width, 80 + 50 * y / height, np.full_like(x, 70)], axis=-1)
    img[int(0.55 * height):int(0.70 * height), int(0.20 * width):int(0.32 * width)] = (200, 30, 30)
    bowl = (x - 0.68 * width) ** 2 + (y - 0.62 * height) ** 2 < (0.09 * width) ** 2
    img[bowl] = (40, 60, 200)
    img[int(0.10 * height):int(0.35 * height), int(0.47 * width):int(0.53 * width)] = (180, 180, 180)
    return np.clip(img, 0, 255).astype(np.uint8)


def run(args) -> int:
    import torch

    from molmoact_edge.export.checkpoint import load_model
    from molmoact_edge.export.tiny import write_checkpoint
    from molmoact_edge.export.torch_backend import TorchBackend
    from molmoact_edge.generate_cmd import result_dict
    from molmoact_edge.runtime.pipeline import ModelSpec, Pipeline

    root = args.out or Path(tempfile.mkdtemp(prefix="molmoact-demo-"))
    ckpt = root / f"checkpoint-{args.size}-seed{args.seed}"
    if not (ckpt / "model.safetensors").exists():
        write_checkpoint(ckpt, args.size, args.seed)
    image = synthetic_scene()
    from PIL import Image

    Image.fromarray(image).save(root / "scene.png")
    spec = ModelSpec.load(ckpt)
    with Pipeline(spec, TorchBackend(load_model(ckpt, torch.float32))) as pipe:
        out = pipe.step([image], args.instruction, max_new_tokens=args.max_new_tokens)
    d = result_dict(out)
    d["checkpoint"] = str(ckpt)
    if args.json:
        print(json.dumps(d, ensure_ascii=False))
        return 0
    t = d["timings_ms"]
    print(f"checkpoint : {ckpt} (random weights, size preset '{args.size}')")
    print(f"image      : {root / 'scene.png'} ({image.shape[1]}x{image.shape[0]})")
    print(f"prompt     : {d['prompt_tokens']} tokens ({out.inputs.n_image_tokens} image tokens, template {d['template']})")
    print(f"generated  : {d['new_tokens']} tokens, stopped on {d['stopped']}")
    print(f"text       : {out.text!r}")
    print("timings ms : " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + f"  ({d['tokens_per_s']} tok/s)")
    return 0
