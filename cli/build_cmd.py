"""``molmoact-edge build``: TensorRT engines written into a bundle, or (``--check-only``) whether
TensorRT 10.3 can take the bundle's graphs, checked without TensorRT or a GPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from molmoact_edge.errors import CommandError, UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory (export --static-kv for the GPU graph)")
    p.add_argument("--max-seq-len", type=int, default=1280,
                   help="KV cache rows the LLM engine is built for (prompt + generated tokens: 806 + 256 for one 640x480 view)")
    p.add_argument("--max-verify", type=int, default=8,
                   help="largest k of a multi-token forward (drafts to verify, grammar-forced spans)")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="TensorRT timing cache file, read if present and written back (speeds up rebuilds)")
    p.add_argument("--check-only", action="store_true",
                   help="check every node, data type and attribute against TensorRT 10.3's ONNX support and that "
                        "only profiled dimensions are dynamic; needs no TensorRT or GPU and writes nothing")


def _check(bundle, max_seq_len: int) -> int:
    from molmoact_edge.export.trt_check import TRT_VERSION, check_graph

    m = bundle.manifest
    if max_seq_len > m.model.max_position_embeddings:
        raise UsageError(f"--max-seq-len {max_seq_len} exceeds the model's max_position_embeddings "
                         f"{m.model.max_position_embeddings}")
    fatal, notes = [], []
    for name, spec in m.graphs.items():
        findings, summary = check_graph(bundle.file(spec.file), name)
        bad = [f for f in findings if f.fatal]
        fatal += bad
        notes += [f.line() for f in findings if not f.fatal]
        print(f"{spec.file}: {summary['nodes']} nodes, {len(summary['ops'])} op types, opset {summary['opset']}: "
              f"{'ok' if not bad else f'{len(bad)} problem(s)'}")
    if "llm_static" not in m.graphs:
        notes.append("note: no llm_static graph (export --static-kv): `build` needs it for the decode engine")
    for n in notes:
        print(n)
    if fatal:
        raise CommandError(f"{len(fatal)} node(s) or input(s) of {bundle.path} cannot be built by TensorRT "
                           f"{TRT_VERSION}:\n" + "\n".join(f.line() for f in fatal))
    print(f"{bundle.path}: every graph passes the TensorRT {TRT_VERSION} check")
    return 0


def run(args) -> int:
    from molmoact_edge.runtime.engine.bundle import load_manifest

    if args.max_seq_len < 2 or args.max_verify < 2:
        raise UsageError("--max-seq-len and --max-verify must be >= 2")
    if args.check_only:
        return _check(load_manifest(args.bundle), args.max_seq_len)
    from molmoact_edge.runtime.engine.trt_build import build_engines, import_tensorrt

    import_tensorrt()  # before reading a multi-GB bundle: fail at once, naming the extra
    try:
        m = build_engines(load_manifest(args.bundle), args.max_seq_len, args.max_verify, args.timing_cache)
    except ValueError as e:
        raise CommandError(str(e)) from e
    for e in m.engines:
        print(e["file"])
    return 0
