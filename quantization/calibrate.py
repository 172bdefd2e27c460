"""Activation statistics of the reference model on a calibration set (torch side).

Each calibration sample (images + instruction) is preprocessed exactly as the runtime does
(``ModelSpec.inputs``) and run as one prefill through the fp32 reference; forward hooks on the
language model's linear layers record, per layer, the largest |input| over all tokens and samples,
as one number (per-tensor, for static activation scales) and per input channel (for smoothing or
activation-aware scaling).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from molmoact_edge.export.model import MolmoAct
from molmoact_edge.quantization.calibration import CalibrationSet
from molmoact_edge.quantization.fake_quant import llm_linears
from molmoact_edge.runtime.engine.pipeline import ModelSpec


@dataclass(frozen=True)
class ActivationStats:
    amax: dict[str, float]  # layer -> max |input| over everything seen
    channel_amax: dict[str, np.ndarray]  # layer -> [in_features] max |input| per channel
    samples: int
    tokens: int


@torch.no_grad()
def collect_activation_stats(model: MolmoAct, model_dir: str | Path, calib: CalibrationSet,
                             max_samples: int | None = None, split: str = "calibration",
                             progress: Callable[[str], None] | None = None) -> ActivationStats:
    spec = ModelSpec.load(model_dir)
    samples = calib.split(split)[:max_samples]
    layers = {name: lin for name, lin in llm_linears(model).items() if name != "lm_head"}
    chan = {name: torch.zeros(lin.in_features) for name, lin in layers.items()}

    def hook(name):
        def record(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
            torch.maximum(chan[name], x, out=chan[name])
        return record

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in layers.items()]
    tokens, t0 = 0, time.perf_counter()
    try:
        for i, sample in enumerate(samples):
            inputs = spec.inputs(sample.load_images(calib.views), sample.instruction)
            ids = torch.from_numpy(inputs.input_ids)[None]
            feats = model.image_features(torch.from_numpy(inputs.vision.crops),
                                         torch.from_numpy(inputs.vision.pooled_patches_idx))
            model.setup_cache(ids.shape[1])
            model(model.embed(ids, feats), 0)
            tokens += ids.shape[1]
            if progress:
                progress(f"calibration sample {i + 1}/{len(samples)} ({ids.shape[1]} tokens, "
                         f"t = {time.perf_counter() - t0:.1f} s)")
    finally:
        for h in handles:
            h.remove()
        model.k_cache = model.v_cache = None
    return ActivationStats({n: float(c.max()) for n, c in chan.items()}, {n: c.numpy() for n, c in chan.items()},
                           len(samples), tokens)
