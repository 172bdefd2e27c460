"""Per-layer sensitivity: which linear layers a recipe hurts most, and a mixed-precision recipe that
keeps those in float.

On the reference checkpoint (torch, fp32) the recipe's own torch simulation
(:func:`~molmoact_edge.quantization.fake_quant.simulated_model`) is built once; then each linear
layer of the language model in turn (and each group of same-role layers: all ``att_proj``, all
``ff_out``, ...) is swapped from the simulation into the float model, alone, and the teacher-forced
next-token distributions over the reference answers are compared with the float model's
(KL(float || one layer quantised), top-1 agreement). Swapping the module (weights and any
activation hook the simulation put on it) keeps this generic over recipes whose effect is local to
the linear layer (weight-only, FP8 weights + activations); a recipe that also rewrites other modules
(e.g. smoothing folded into a norm) is measured only for its linear part.

The proposed recipe keeps the most sensitive layers in float, in rank order, up to ``keep_top`` layers
and within ``keep_budget`` (a fraction of the linear parameters: a layer that would exceed it is
passed over, so on a small model a huge lm_head does not take the whole budget); ``quantize
--keep-float`` applies it, and its simulated effect is measured here too (every layer quantised but
those).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from molmoact_edge.export.checkpoint import load_model
from molmoact_edge.export.torch_backend import TorchBackend
from molmoact_edge.quantization.fake_quant import llm_linears, simulated_model
from molmoact_edge.quantization.study import kl_rows, teacher_forced_logits
from molmoact_edge.runtime.engine.pipeline import ModelSpec


def _module_path(layer: str) -> str:
    return layer if layer == "lm_head" else f"model.{layer}"


def _swap(model: torch.nn.Module, layer: str, new: torch.nn.Module) -> torch.nn.Module:
    """Put ``new`` where ``layer`` is in ``model``; returns the module it replaced."""
    parent_path, _, attr = _module_path(layer).rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def group_of(layer: str) -> str:
    """``transformer.blocks.3.mlp.ff_out`` -> ``mlp.ff_out`` (the same role in every block)."""
    parts = layer.split(".")
    return ".".join(parts[3:]) if layer.startswith("transformer.blocks.") else layer


def default_keep_top(n_layers: int) -> int:
    """5% of the linear layers, at least one (1 of the fixture's 9; 6 of a 7B's 113)."""
    return max(1, math.ceil(0.05 * n_layers))


def prepared_recipe(recipe, checkpoint: Path, reference, calib, max_samples: int | None, say):
    """The recipe with its calibration filled in (data-dependent schemes), as ``quantize`` does."""
    if not recipe.uses_calibration:
        return recipe
    import dataclasses

    from molmoact_edge.quantization.calibration import load_calibration_set
    from molmoact_edge.quantization.quantize import calibrated

    if max_samples is not None and hasattr(recipe, "max_samples"):
        recipe = dataclasses.replace(recipe, max_samples=max_samples)
    return calibrated(recipe, reference, checkpoint, load_calibration_set(calib), lambda s: say("  " + s))


@torch.no_grad()
def layer_sensitivity(checkpoint: str | Path, recipe, samples, answers: list[list[int]], keep_top: int | None = None,
                      calib=None, calib_samples: int | None = None, keep_budget: float = 0.1,
                      progress: Callable[[str], None] = print) -> dict:
    """Rank the LLM's linear layers by the teacher-forced KL each one causes when it alone is
    quantised by ``recipe``; ``samples`` (study.SampleData) with the reference ``answers`` (ids)."""
    from molmoact_edge.quantization.recipes import FloatRecipe

    if isinstance(recipe, FloatRecipe):
        raise ValueError("fp16 quantises no layer; rank the layers of a quantising scheme (e.g. int4-rtn)")
    checkpoint = Path(checkpoint)
    t0 = time.perf_counter()
    spec = ModelSpec.load(checkpoint)
    ref = load_model(checkpoint, torch.float32)
    recipe = prepared_recipe(recipe, checkpoint, ref, calib, calib_samples, progress)
    sim = simulated_model(checkpoint, recipe)
    ref_lin, sim_lin = llm_linears(ref), llm_linears(sim)
    backend = TorchBackend(ref)
    inputs = [spec.inputs(s.images, s.instruction) for s in samples]
    base = [teacher_forced_logits(backend, x, ids) for x, ids in zip(inputs, answers)]

    def score(swapped: list[str]) -> dict:
        old = {name: _swap(ref, name, sim_lin[name]) for name in swapped}
        try:
            kls, agree = [], []
            for x, ids, b in zip(inputs, answers, base):
                lq = teacher_forced_logits(backend, x, ids)
                kls.append(kl_rows(b, lq))
                agree.append(b.argmax(-1) == lq.argmax(-1))
        finally:
            for name, mod in old.items():
                _swap(ref, name, mod)
        kl = np.concatenate(kls)
        return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float(np.concatenate(agree).mean())}

    names = list(ref_lin)
    k = default_keep_top(len(names)) if keep_top is None else keep_top
    if not 0 <= k <= len(names):  # checked before the expensive part
        raise ValueError(f"--keep-top must be between 0 and the {len(names)} linear layers, got {k}")
    if not 0 <= keep_budget <= 1:
        raise ValueError(f"--keep-budget is a fraction of the linear parameters in [0, 1], got {keep_budget}")
    layers = []
    for i, name in enumerate(names):
        row = {"layer": name, "group": group_of(name), "params": int(ref_lin[name].weight.numel()), **score([name])}
        layers.append(row)
        progress(f"sensitivity {i + 1}/{len(names)} {name}: KL {row['kl']:.3g}, top-1 {row['top1_agreement']:.3f}")
    layers.sort(key=lambda r: -r["kl"])
    groups = []
    for g in dict.fromkeys(group_of(n) for n in names):
        members = [n for n in names if group_of(n) == g]
        groups.append({"group": g, "layers": len(members), **score(members)})
    groups.sort(key=lambda r: -r["kl"])
    total = sum(r["params"] for r in layers)
    keep, extra = [], 0
    for r in layers:
        if len(keep) < k and extra + r["params"] <= keep_budget * total:
            keep.append(r["layer"])
            extra += r["params"]
    full = score(names)
    mixed = score([n for n in names if n not in keep])
    progress(f"sensitivity: whole recipe KL {full['kl']:.3g}; keeping {keep} in float: KL {mixed['kl']:.3g} "
             f"({time.perf_counter() - t0:.1f} s)")
    scheme, target = recipe.scheme, getattr(recipe, "target", "onnxruntime")
    group = getattr(recipe, "group_size", None)
    cmd = (f"molmoact-edge quantize --checkpoint {checkpoint} --scheme {scheme}"
           + (f" --target {target}" if target != "onnxruntime" else "")
           + (f" --group-size {group}" if group and scheme != "int8-wo" else "")
           + (f" --keep-float {','.join(keep)}" if keep else "") + " --out BUNDLE")
    return {"checkpoint": str(checkpoint), "scheme": scheme, "target": target, "samples": len(samples),
            "positions": int(sum(len(a) for a in answers)), "layers": layers, "groups": groups,
            "whole_recipe": full,
            "proposed": {"keep_float": keep, "keep_top": k, "keep_budget": keep_budget, "float_params": extra,
                         "float_params_fraction": extra / total, **mixed,
                         "command": cmd}}
