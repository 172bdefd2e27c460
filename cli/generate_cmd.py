"""``molmoact-edge generate``: one MolmoAct step on image files and an instruction."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="Hugging Face MolmoAct checkpoint folder (torch reference)")
    src.add_argument("--bundle", type=Path, help="exported bundle folder (see `molmoact-edge export`)")
    p.add_argument("--bundle-sha256", default=None, metavar="HEX",
                   help="refuse the bundle unless sha256sum of its manifest.json is HEX (pins every file)")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default=None,
                   help="engine: torch for --checkpoint (default), onnxruntime for --bundle (default)")
    p.add_argument("--image", action="append", required=True, type=Path,
                   help="an image file; repeat for several camera views (first = main view)")
    p.add_argument("--instruction", required=True, help="the task, e.g. 'close the box'")
    p.add_argument("--template", choices=["single", "multi"], default=None,
                   help="prompt template: single for one image, multi for several (default by image count)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget (official: 256, 512 for chunks)")
    p.add_argument("--dtype", default="fp32", help="torch reference weights dtype: fp32, bf16, fp16")
    p.add_argument("--device", default="cpu", help="torch reference device, e.g. cpu or cuda")
    p.add_argument("--unnorm-key", default=None,
                   help="norm_stats key used to de-normalise actions (needed when the checkpoint has several)")
    p.add_argument("--no-grammar", action="store_true",
                   help="plain greedy decoding, token for token the official implementation's output "
                        "(default: grammar-constrained decoding, which always yields a parseable answer)")
    p.add_argument("--max-actions", type=int, default=8,
                   help="most action lists the grammar allows in one answer (fine-tuned checkpoints emit 8)")
    p.add_argument("--steer-trace", default=None, metavar="JSON",
                   help='force this trace into the answer, e.g. "[[120, 200], [140, 180]]" (0-255, first image)')
    p.add_argument("--stream", action="store_true", help="print depth / trace / actions to stderr as they complete")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _load_images(paths):
    from molmoact_edge.runtime.engine.images import ImageError, load_image

    try:
        return [load_image(path) for path in paths]
    except ImageError as e:
        raise SystemExit(f"error: {e}") from None


def open_pipeline(args):
    """The pipeline for --checkpoint (torch reference) or --bundle (deployed engine)."""
    if args.checkpoint is not None:
        if args.bundle_sha256 is not None:
            raise SystemExit("error: --bundle-sha256 pins a bundle; it does not apply to --checkpoint")
        if args.backend not in (None, "torch"):
            raise SystemExit("error: --checkpoint runs the torch reference; export a bundle for other backends")
        try:
            import torch  # noqa: F401  (only to give a clear message when the export extra is absent)
        except ImportError:
            raise SystemExit("error: --checkpoint needs torch: pip install torch==2.13.0 'molmoact-edge[export]'")
        from molmoact_edge.export.checkpoint import parse_dtype
        from molmoact_edge.export.torch_backend import open_checkpoint

        return open_checkpoint(args.checkpoint, parse_dtype(args.dtype), args.device)
    from molmoact_edge.runtime.engine.pipeline import open_bundle

    return open_bundle(args.bundle, backend=args.backend or "onnxruntime", bundle_sha256=args.bundle_sha256)


def run(args) -> int:
    from molmoact_edge.runtime.engine.config import ConfigError
    from molmoact_edge.runtime.engine.deps import BackendUnavailable
    from molmoact_edge.runtime.engine.generate import NonFiniteError
    from molmoact_edge.runtime.engine.grammar import GrammarError
    from molmoact_edge.runtime.engine.prompt import InputError, check_instruction

    if args.max_new_tokens < 1:
        raise SystemExit("error: --max-new-tokens must be >= 1")
    try:
        check_instruction(args.instruction)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    images = _load_images(args.image)
    steer = None
    if args.steer_trace is not None:
        try:
            steer = [tuple(int(v) for v in pt) for pt in json.loads(args.steer_trace)]
        except (json.JSONDecodeError, TypeError, ValueError):
            raise SystemExit(f"error: --steer-trace must be a JSON list of [x, y] integer pairs, got {args.steer_trace!r}")

    def stream(ev):
        if args.stream:
            print(json.dumps(ev.to_dict()), file=sys.stderr, flush=True)

    try:
        with open_pipeline(args) as pipe:
            res = pipe.act(images, args.instruction, template=args.template, max_new_tokens=args.max_new_tokens,
                           grammar=not args.no_grammar, max_actions=args.max_actions, unnorm_key=args.unnorm_key,
                           steer_trace=steer, on_event=stream)
    except NonFiniteError as e:  # the model failed at run time: no answer, no action
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, GrammarError, ValueError, BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(res.to_json())
        return 0
    print(res.text)
    if res.actions.size:
        print("actions:", [[round(float(v), 4) for v in row] for row in res.actions], file=sys.stderr)
    if res.actions_error is not None:
        print(f"actions: unavailable: {res.actions_error}", file=sys.stderr)
    for err in res.parse_errors:
        print(f"parse: {err}", file=sys.stderr)
    t, r = res.timings_ms, res.generation
    print(f"[{r.prompt_tokens} prompt tokens, {len(r.token_ids)} new, stopped on {r.stopped}; "
          f"vision {t['vision']:.0f} ms, prefill {t['prefill']:.0f} ms, decode {t['decode']:.0f} ms "
          f"({r.tokens_per_s:.2f} tok/s)]", file=sys.stderr)
    return 0
