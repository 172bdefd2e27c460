"""``molmoact-edge export``: checkpoint -> bundle (ONNX graphs + embeddings + tokenizer + manifest)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="Hugging Face MolmoAct checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="graph and KV-cache precision")
    p.add_argument("--opset", type=int, default=18,
                   help="ONNX opset (18: portable baseline that TensorRT 10.3 / JetPack 6 parses)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")


def run(args) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        print("error: export needs torch: pip install torch==2.13.0 'molmoact-edge[export]'", file=sys.stderr)
        return 2
    from molmoact_edge.export.checkpoint import CheckpointError
    from molmoact_edge.export.onnx_export import export_bundle
    from molmoact_edge.runtime.engine.config import ConfigError

    try:
        out = export_bundle(args.checkpoint, args.out, args.dtype, args.opset, args.force)
    except (ConfigError, CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
