"""``molmoact-edge quantize``: checkpoint -> quantised bundle (a bundle plus its recipe)."""

from __future__ import annotations

import argparse
from pathlib import Path

from molmoact_edge.errors import CommandError, UsageError

SCHEMES = ["fp16", "int8-wo", "int4-rtn", "w8a8-sq", "int4-awq", "fp8"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="Hugging Face MolmoAct checkpoint folder")
    p.add_argument("--scheme", required=True, choices=SCHEMES,
                   help="fp16 | int8-wo (INT8 weights per output channel) | int4-rtn (INT4 blockwise) | "
                        "fp8 (E4M3 weights per channel, static per-tensor activations; Q/DQ graph) | "
                        "w8a8-sq (SmoothQuant alpha 0.5, INT8 weights per channel, static INT8 activations) | "
                        "int4-awq (INT4 blockwise with AWQ scales searched on the calibration set)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--target", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                   help="graph form: onnxruntime kernels (MatMulNBits, its integer MatMul) or TensorRT explicit Q/DQ")
    p.add_argument("--calib", type=Path, default=None,
                   help="calibration set folder (default: the shipped set; data-free schemes only record it)")
    p.add_argument("--group-size", type=int, default=None,
                   help="INT4 group along the input dimension (power of two >= 16; default 128)")
    p.add_argument("--keep-float", type=_layer_list, default=(), metavar="LAYER,...",
                   help="linear layers to leave in float (mixed precision), named as in the manifest's "
                        "linear_layers, e.g. lm_head,transformer.blocks.0.mlp.ff_out; `molmoact-edge study "
                        "--checkpoint` proposes a list")
    p.add_argument("--static-kv", action="store_true",
                   help="also write llm_static.onnx (the static-cache LLM graph GPU engines build from, as export "
                        "--static-kv) and quantise it by the same recipe; not with w8a8-sq --target onnxruntime")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")


def _layer_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated layer names, e.g. lm_head,transformer.blocks.0.mlp.ff_out")
    return names


def run(args) -> int:
    # torch/onnxruntime missing: the central error path names the extra to install (cli/errors.py)
    from molmoact_edge.export.checkpoint import CheckpointError
    from molmoact_edge.quantization.calibration import CalibrationError
    from molmoact_edge.quantization.quantize import check_static_graph, quantize_bundle
    from molmoact_edge.quantization.recipes import recipe_for
    from molmoact_edge.runtime.engine.config import ConfigError

    try:
        recipe = recipe_for(args.scheme, args.target, args.group_size)
        if args.static_kv:
            check_static_graph(recipe)
    except (ValueError, NotImplementedError) as e:  # a scheme/target/group the recipes refuse: usage
        raise UsageError(str(e)) from e
    try:
        out = quantize_bundle(args.checkpoint, args.out, recipe, calib=args.calib, force=args.force,
                              keep_float=args.keep_float, static_kv=args.static_kv)
    except (ConfigError, CheckpointError, CalibrationError, FileExistsError, ValueError) as e:
        raise CommandError(str(e)) from e
    print(out)
    return 0
