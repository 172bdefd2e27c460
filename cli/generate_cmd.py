"""``molmoact-edge generate``: one MolmoAct step on image files and an instruction."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from molmoact_edge.argtypes import instruction, positive_int, torch_device, trace_points
from molmoact_edge.errors import CommandError, UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="Hugging Face MolmoAct checkpoint folder (torch reference)")
    src.add_argument("--bundle", type=Path, help="exported bundle folder (see `molmoact-edge export`)")
    p.add_argument("--bundle-sha256", default=None, metavar="HEX",
                   help="refuse the bundle unless sha256sum of its manifest.json is HEX (pins every file)")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default=None,
                   help="engine: torch for --checkpoint (default), onnxruntime for --bundle (default), or the "
                        "bundle's TensorRT engines (molmoact-edge build)")
    p.add_argument("--providers", choices=["cpu", "cuda", "tensorrt"], default=None,
                   help="onnxruntime execution providers for --bundle (cuda / tensorrt need onnxruntime-gpu)")
    p.add_argument("--image", action="append", required=True, type=Path,
                   help="an image file; repeat for several camera views (first = main view)")
    p.add_argument("--instruction", required=True, type=instruction, help="the task, e.g. 'close the box'")
    p.add_argument("--template", choices=["single", "multi"], default=None,
                   help="prompt template: single for one image, multi for several (default by image count)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="generation budget (official: 256, 512 for chunks)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="torch reference weights dtype")
    p.add_argument("--device", default="cpu", type=torch_device, help="torch reference device: cpu, cuda, cuda:N")
    p.add_argument("--unnorm-key", default=None,
                   help="norm_stats key used to de-normalise actions (needed when the checkpoint has several)")
    p.add_argument("--no-grammar", action="store_true",
                   help="plain greedy decoding, token for token the official implementation's output "
                        "(default: grammar-constrained decoding, which always yields a parseable answer)")
    p.add_argument("--max-actions", type=positive_int, default=8,
                   help="most action lists the grammar allows in one answer (fine-tuned checkpoints emit 8)")
    p.add_argument("--steer-trace", default=None, metavar="JSON", type=trace_points,
                   help='force this trace into the answer, e.g. "[[120, 200], [140, 180]]" (0-255, first image)')
    p.add_argument("--draft-from", type=Path, default=None, metavar="PREVIOUS.json",
                   help="speculative decoding drafted from an earlier answer (the --json output of a previous "
                        "generate, e.g. of the last camera frame): same ids, fewer sequential forwards")
    p.add_argument("--draft-ngram", action="store_true",
                   help="also draft from repeats within the answer itself (same ids, fewer forwards)")
    p.add_argument("--stream", action="store_true", help="print depth / trace / actions to stderr as they complete")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _load_images(paths):
    from molmoact_edge.runtime.engine.images import load_image

    return [load_image(path) for path in paths]  # an ImageError is one `error:` line (cli/errors.py)


def read_draft(path: Path) -> list[int]:
    """The token ids of an earlier ``generate --json`` answer."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"--draft-from {path}: cannot read it ({e.strerror or e}); pass the file that "
                         "`molmoact-edge generate --json` wrote for an earlier step") from e
    except ValueError as e:
        raise UsageError(f"--draft-from {path}: not JSON ({e}); pass the --json output of an earlier generate") from e
    ids = data.get("token_ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise UsageError(f"--draft-from {path}: no 'token_ids' list of non-negative integers; pass the --json "
                         "output of an earlier `molmoact-edge generate`")
    return ids


def check_args(args) -> None:
    """What can be refused before any model loads: flag combinations, the model folder, the device."""
    if args.checkpoint is not None and args.bundle_sha256 is not None:
        raise UsageError("--bundle-sha256 pins a bundle; it does not apply to --checkpoint")
    if args.checkpoint is not None and args.backend not in (None, "torch"):
        raise UsageError(f"--backend {args.backend} needs --bundle: --checkpoint runs the torch reference "
                         "(export a bundle with `molmoact-edge export` for onnxruntime)")
    if args.bundle is not None and args.backend not in (None, "onnxruntime", "tensorrt"):
        raise UsageError(f"--backend {args.backend} needs --checkpoint: a bundle runs on onnxruntime or tensorrt")
    if args.providers is not None and (args.bundle is None or args.backend not in (None, "onnxruntime")):
        raise UsageError("--providers selects onnxruntime's execution providers: use it with --bundle and the "
                         "onnxruntime backend")
    if args.steer_trace is not None and args.no_grammar:
        raise UsageError("--steer-trace forces the trace through the output grammar: drop --no-grammar")
    if getattr(args, "draft_from", None) is not None:
        args.draft_ids = read_draft(args.draft_from)
    if args.checkpoint is not None:
        require_checkpoint_dir(args.checkpoint)
        require_device(args.device)
    source = args.checkpoint or args.bundle
    if args.unnorm_key is not None and (source / "config.json").is_file():
        from molmoact_edge.runtime.engine.config import ConfigError, ModelConfig

        config = ModelConfig.load(source)  # config.json only: cheap, and a broken one is a run-time failure
        try:
            config.resolve_unnorm_key(args.unnorm_key)
        except ConfigError as e:
            raise UsageError(str(e)) from e


def require_checkpoint_dir(path: Path) -> None:
    """The one message for a checkpoint folder that is not there (generate and export)."""
    if not (path / "config.json").is_file():
        state = "does not exist" if not path.exists() else "holds no config.json"
        raise CommandError(f"checkpoint folder {path} {state}: pass a Hugging Face MolmoAct checkpoint folder "
                           "(config.json + *.safetensors; README 'Where the model comes from')")


def require_device(device: str) -> None:
    """Refuse a CUDA device that this torch cannot use, before the weights load (whose errors would
    otherwise blame the checkpoint file)."""
    import torch

    if device.startswith("cuda"):
        if not torch.backends.cuda.is_built():
            raise CommandError(f"--device {device}: this torch ({torch.__version__}) was built without CUDA; "
                               "use --device cpu or install a CUDA build of torch (README 'Installing torch')")
        if not torch.cuda.is_available():
            raise CommandError(f"--device {device}: torch sees no CUDA GPU (driver missing or "
                               "CUDA_VISIBLE_DEVICES empty); use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise CommandError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise CommandError("--device mps: this torch has no usable MPS (Apple GPU) backend; use --device cpu")


def open_pipeline(args):
    """The pipeline for --checkpoint (torch reference) or --bundle (deployed engine); `check_args` first."""
    if args.checkpoint is not None:
        from molmoact_edge.export.checkpoint import parse_dtype
        from molmoact_edge.export.torch_backend import open_checkpoint

        return open_checkpoint(args.checkpoint, parse_dtype(args.dtype), args.device)
    from molmoact_edge.runtime.engine.pipeline import open_bundle

    options = {"providers": args.providers} if args.providers else {}
    return open_bundle(args.bundle, backend=args.backend or "onnxruntime", bundle_sha256=args.bundle_sha256, **options)


def run(args) -> int:
    from molmoact_edge.runtime.engine.config import ConfigError
    from molmoact_edge.runtime.engine.deps import BackendUnavailable
    from molmoact_edge.runtime.engine.generate import NonFiniteError
    from molmoact_edge.runtime.engine.grammar import GrammarError

    check_args(args)  # before the images and the model load
    images = _load_images(args.image)
    steer = args.steer_trace

    def stream(ev):
        if args.stream:
            print(json.dumps(ev.to_dict()), file=sys.stderr, flush=True)

    try:
        with open_pipeline(args) as pipe:
            res = pipe.act(images, args.instruction, template=args.template, max_new_tokens=args.max_new_tokens,
                           grammar=not args.no_grammar, max_actions=args.max_actions, unnorm_key=args.unnorm_key,
                           steer_trace=steer, on_event=stream, draft_from=getattr(args, "draft_ids", None),
                           draft_ngram=args.draft_ngram)
    except (ConfigError, GrammarError, ValueError, BackendUnavailable, NonFiniteError) as e:
        # NonFiniteError: the model failed at run time; there is no answer and no action
        raise CommandError(str(e)) from e
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
          f"({r.tokens_per_s:.2f} tok/s), {r.forwards} LLM forwards]", file=sys.stderr)
    if r.drafts.draft_tokens:
        print(f"[drafts: {r.drafts.accepted_tokens} of {r.drafts.draft_tokens} drafted tokens accepted]",
              file=sys.stderr)
    return 0
