"""``molmoact-edge export``: checkpoint -> bundle (ONNX graphs + embeddings + tokenizer + manifest)."""

from __future__ import annotations

import argparse
from pathlib import Path

from molmoact_edge.errors import CommandError, Interrupted


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="Hugging Face MolmoAct checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="graph and KV-cache precision")
    p.add_argument("--opset", type=int, default=18,
                   help="ONNX opset (18: portable baseline that TensorRT 10.3 / JetPack 6 parses)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--static-kv", action="store_true",
                   help="also write llm_static.onnx, the static-shape LLM graph that GPU engines (build) need "
                        "(a second copy of the LLM weights)")


def run(args) -> int:
    from molmoact_edge.generate_cmd import require_checkpoint_dir

    require_checkpoint_dir(args.checkpoint)
    from molmoact_edge.export.onnx_export import export_bundle

    try:
        out = export_bundle(args.checkpoint, args.out, args.dtype, args.opset, args.force,
                            static_kv=args.static_kv)
    except FileExistsError as e:
        raise CommandError(str(e)) from e
    except KeyboardInterrupt:
        raise Interrupted(f"export interrupted; {args.out} was left as it was (the bundle is written beside it "
                          "and moved into place only when complete)") from None
    print(out)
    return 0
