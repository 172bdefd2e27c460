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


@dataclass(frozen=True)
class LayerInputs:
    """What the smoothing recipes need of each linear's input, over every calibration token:
    per-channel max |x| (SmoothQuant) and mean |x| (AWQ), a random subset of whole input rows
    (the AWQ search's objective), and each sample's prefill embeddings (onnxruntime's calibrator
    feeds them to the graph: the embedding gather and vision tower are not part of the LLM graph)."""

    channel_amax: dict[str, np.ndarray]
    channel_mean: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]  # layer -> [<= max_rows, in_features] float32
    embeds: tuple[np.ndarray, ...]  # [1, tokens, hidden] per sample
    samples: int
    tokens: int


@torch.no_grad()
def collect_layer_inputs(model: MolmoAct, model_dir: str | Path, calib: CalibrationSet, max_samples: int | None = None,
                         split: str = "calibration", max_rows: int = 512, seed: int = 0,
                         progress: Callable[[str], None] | None = None) -> LayerInputs:
    spec = ModelSpec.load(model_dir)
    samples = calib.split(split)[:max_samples]
    if not samples:
        raise ValueError(f"the calibration set {calib.path} has no {split!r} samples")
    layers = {name: lin for name, lin in llm_linears(model).items() if name != "lm_head"}
    amax = {n: torch.zeros(lin.in_features, dtype=torch.float64) for n, lin in layers.items()}
    total = {n: torch.zeros(lin.in_features, dtype=torch.float64) for n, lin in layers.items()}
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    per_sample = -(-max_rows // len(samples))
    gen = torch.Generator().manual_seed(seed)

    def hook(name):
        def record(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            torch.maximum(amax[name], x.abs().amax(dim=0).double(), out=amax[name])
            total[name] += x.abs().double().sum(dim=0)
            pick = torch.randperm(x.shape[0], generator=gen)[:per_sample]
            kept[name].append(x[pick].clone())
        return record

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in layers.items()]
    tokens, embeds, t0 = 0, [], time.perf_counter()
    try:
        for i, sample in enumerate(samples):
            inputs = spec.inputs(sample.load_images(calib.views), sample.instruction)
            ids = torch.from_numpy(inputs.input_ids)[None]
            feats = model.image_features(torch.from_numpy(inputs.vision.crops),
                                         torch.from_numpy(inputs.vision.pooled_patches_idx))
            x = model.embed(ids, feats)
            embeds.append(x.float().numpy())
            model.setup_cache(ids.shape[1])
            model(x, 0)
            tokens += ids.shape[1]
            if progress:
                progress(f"calibration sample {i + 1}/{len(samples)} ({ids.shape[1]} tokens, "
                         f"t = {time.perf_counter() - t0:.1f} s)")
    finally:
        for h in handles:
            h.remove()
        model.k_cache = model.v_cache = None
    rows = {n: torch.cat(v)[:max_rows].numpy() for n, v in kept.items()}
    return LayerInputs({n: a.float().numpy() for n, a in amax.items()},
                       {n: (t / tokens).float().numpy() for n, t in total.items()}, rows, tuple(embeds),
                       len(samples), tokens)
