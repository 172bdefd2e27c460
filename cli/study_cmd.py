"""``molmoact-edge study``: what quantised bundles do to the answer, against a reference bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from molmoact_edge.errors import CommandError, UsageError


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", type=Path, required=True, help="the reference bundle (e.g. the fp32 export)")
    p.add_argument("--candidates", type=Path, nargs="+", required=True,
                   help="bundles to compare with the reference (any scheme `quantize` writes; the reference "
                        "itself is a valid sanity check: agreement 1, KL 0, errors 0)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json and the plots")
    p.add_argument("--data", type=Path, default=None,
                   help="calibration-set folder whose held-out split is used (default: the shipped set)")
    p.add_argument("--split", choices=["evaluation", "calibration"], default="evaluation",
                   help="which split to measure on; quantisers calibrate on 'calibration', so the study "
                        "measures on 'evaluation'")
    p.add_argument("--samples", type=_positive, default=None, help="use only the first N samples of the split")
    p.add_argument("--unnorm-key", default=None,
                   help="norm_stats key for de-normalising actions (needed when the checkpoint has several)")
    p.add_argument("--max-new-tokens", type=_positive, default=256, help="answer budget (grammar on)")
    p.add_argument("--threads", type=_positive, default=None, help="onnxruntime intra-op threads")
    task = p.add_argument_group("task success (the demo task in the rendered tabletop; meaningful for the trained "
                                "demo policy's bundles)")
    task.add_argument("--task-episodes", type=int, default=0,
                      help="run each candidate closed-loop on this many seeded episodes (`eval`'s) and report its "
                           "success rate; 0: off")
    task.add_argument("--task-seed", type=int, default=1000, help="first episode seed (>= 1000: never trained on)")
    task.add_argument("--task-limit", type=float, default=30.0, help="simulated seconds per episode")
    sens = p.add_argument_group("per-layer sensitivity (torch; needs the reference checkpoint)")
    sens.add_argument("--checkpoint", type=Path, default=None,
                      help="the reference's checkpoint folder: ranks the linear layers one at a time and "
                           "proposes a --keep-float list for `quantize`")
    sens.add_argument("--sensitivity-scheme", default="int4-rtn", help="the recipe whose layers are ranked")
    sens.add_argument("--sensitivity-target", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    sens.add_argument("--keep-top", type=int, default=None,
                      help="layers the proposed recipe keeps in float (default: 5%% of them, at least 1)")
    sens.add_argument("--keep-budget", type=float, default=0.1,
                      help="most the kept layers may hold, as a fraction of the linear parameters (a layer "
                           "that would exceed it is passed over)")
    sens.add_argument("--calib", type=Path, default=None,
                      help="calibration set for data-dependent schemes (default: the shipped set)")
    sens.add_argument("--calib-samples", type=_positive, default=None,
                      help="calibration samples for data-dependent schemes (default: the whole split)")


def _task_success_hook(args):
    """None, or the per-candidate closed-loop evaluation the study calls (validated before any work)."""
    if args.task_episodes < 0:
        raise UsageError(f"--task-episodes must be >= 0, got {args.task_episodes}")
    if args.task_episodes == 0:
        return None
    if args.task_seed < 1000:
        raise UsageError(f"--task-seed {args.task_seed}: seeds below 1000 are the demo policy's training seeds")
    from molmoact_edge.runtime.control.evaluate import EvalConfig, bundle_task_success

    try:
        config = EvalConfig(limit_s=args.task_limit, worker="process")
    except ValueError as e:
        raise UsageError(str(e)) from e
    seeds = [args.task_seed + i for i in range(args.task_episodes)]
    return lambda bundle: bundle_task_success(bundle, seeds, config, args.unnorm_key)


def run(args) -> int:
    from molmoact_edge.quantization.calibration import CalibrationError
    from molmoact_edge.quantization.study_run import run_study
    from molmoact_edge.runtime.engine.config import ConfigError

    for b in [args.reference, *args.candidates]:
        if not (b / "manifest.json").is_file():
            raise UsageError(f"{b} is not a bundle (no manifest.json); make one with `molmoact-edge export` or "
                             "`molmoact-edge quantize`")
    if args.checkpoint is not None:
        from molmoact_edge.generate_cmd import require_checkpoint_dir
        from molmoact_edge.quantization.recipes import recipe_for

        require_checkpoint_dir(args.checkpoint)
        try:
            recipe = recipe_for(args.sensitivity_scheme, args.sensitivity_target)
        except (ValueError, NotImplementedError) as e:
            raise UsageError(str(e)) from e
        from molmoact_edge.quantization.recipes import FloatRecipe

        if isinstance(recipe, FloatRecipe):
            raise UsageError("--sensitivity-scheme fp16 quantises no layer; choose a quantising scheme (e.g. int4-rtn)")
    task_success = _task_success_hook(args)
    try:
        run_study(args.reference, args.candidates, args.out, data=args.data, split=args.split,
                  unnorm_key=args.unnorm_key, samples=args.samples, max_new_tokens=args.max_new_tokens,
                  threads=args.threads, checkpoint=args.checkpoint, sensitivity_scheme=args.sensitivity_scheme,
                  sensitivity_target=args.sensitivity_target, keep_top=args.keep_top, keep_budget=args.keep_budget, calib=args.calib,
                  calib_samples=args.calib_samples, task_success=task_success)
    except (ConfigError, CalibrationError):
        raise  # already explained; the central error path reports them (exit 1)
    except ValueError as e:
        raise CommandError(str(e)) from e
    print(args.out / "report.md")
    return 0
