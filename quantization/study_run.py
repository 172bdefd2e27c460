"""The study end to end: compare the candidates, optionally rank the layers, write the report.

Task success hook: ``task_success(bundle_path) -> dict | None`` is called once per candidate; its
result is stored as the candidate's ``task_success`` (e.g. ``{"episodes": 20, "successes": 17,
"seeds": [...]}``). `molmoact-edge study --task-episodes N` passes one that runs the demo task's
closed-loop episodes (runtime/control/evaluate.bundle_task_success). Without one the field is null
and the report says why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from molmoact_edge.quantization import study
from molmoact_edge.quantization.study_report import (
    FORMAT,
    FORMAT_VERSION,
    TASK_SUCCESS_NOTE,
    candidate_entry,
    write_json,
    write_markdown,
    write_plots,
)

NOTES = [
    "Teacher-forced numbers feed the reference's own answer to both bundles: they isolate the per-token effect "
    "of quantisation from the compounding of an early divergence. 'top-1 (grammar)' compares the choice among "
    "the tokens the grammar allows, which is what the constrained decoder decides (forced tokens agree trivially).",
    "Free-running numbers (first divergence, depth, trace, actions) compare whole answers; once the answers "
    "diverge, later parts differ for that reason alone.",
    "Action errors are over the action lists both answers have, de-normalised with the unnorm key; translation "
    "in mm (metres x 1000), rotation in degrees (radians), a gripper flip is the value on the other side of 0.",
    "Bytes read per token: every constant of the LLM graph, one embedding row and the KV cache at the mean "
    "answer position; ms/token: one-token decode forwards during the free-running answers (onnxruntime CPU, "
    "under whatever load the machine had); peak RSS: the whole process (reference included) while the "
    "candidate ran.",
    "With random weights (the test fixtures) the logits are nearly flat: small weight errors flip greedy choices "
    "that a trained model would make with a margin, so agreement is pessimistic and action errors are not robot "
    "behaviour; the ranking of schemes and layers, bytes and speed are still meaningful.",
]


def run_study(reference: Path, candidates: list[Path], out: Path, data: Path | None = None, split: str = "evaluation",
              unnorm_key: str | None = None, samples: int | None = None, max_new_tokens: int = 256,
              threads: int | None = None, checkpoint: Path | None = None, sensitivity_scheme: str = "int4-rtn",
              sensitivity_target: str = "onnxruntime", keep_top: int | None = None, keep_budget: float = 0.1,
              calib: Path | None = None,
              calib_samples: int | None = None, task_success: Callable[[Path], dict | None] | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """Write ``report.json``, ``report.md`` and the plots under ``out``; returns the report."""
    progress = progress or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cs, chosen = study.load_samples(data, split, samples)
    if not chosen:
        raise ValueError(f"{cs.path}: no samples in split {split!r}")
    progress(f"study: {len(candidates)} candidate(s) against {reference} on {len(chosen)} {split} samples of {cs.path}")
    ref_answers, results = study.compare(Path(reference), [Path(c) for c in candidates], chosen, unnorm_key,
                                         max_new_tokens, threads, progress)
    past = float(np.mean([a.prompt_tokens + len(a.ids) / 2 for a in ref_answers]))  # mean KV length while decoding
    entries = {}
    for res in results:
        path = Path(res.path)
        costs = {"bytes": study.bundle_disk_bytes(path), "bytes_per_token": study.bytes_per_token(path, past)}
        entries[res.label] = candidate_entry(res, costs, task_success(path) if task_success else None)
    sens = None
    if checkpoint is not None:
        from molmoact_edge.quantization.recipes import recipe_for
        from molmoact_edge.quantization.sensitivity import layer_sensitivity

        recipe = recipe_for(sensitivity_scheme, sensitivity_target)
        sens = layer_sensitivity(checkpoint, recipe, chosen, [a.ids for a in ref_answers], keep_top, calib,
                                 calib_samples, keep_budget, progress)
    report = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "reference": {"path": str(reference), "scheme": study.scheme_of(Path(reference)),
                      "answer_tokens": [len(a.ids) for a in ref_answers],
                      "answer_ids": [a.ids for a in ref_answers],
                      "stopped": [a.stopped for a in ref_answers]},
        "data": {"path": str(cs.path), "split": split, "samples": len(chosen), "sha256": cs.sha256,
                 "ids": [s.id for s in chosen]},
        "settings": {"unnorm_key": ref_answers[0].unnorm_key, "max_new_tokens": max_new_tokens, "threads": threads,
                     "grammar": True, "kv_past_for_bytes": past},
        "candidates": entries, "sensitivity": sens,
        "task_success_note": None if task_success else TASK_SUCCESS_NOTE,
        "notes": NOTES,
    }
    report["plots"] = write_plots(out, results, sens)
    write_json(out, report)
    write_markdown(out, report)
    progress(f"study: wrote {out / 'report.md'}, {out / 'report.json'} and {len(report['plots'])} plots")
    return json.loads((out / "report.json").read_text())
