"""The torch side of every recipe: a fake-quant simulation on the reference model.

The simulation is the recipe's definition run in torch (quantise, dequantise, compute in float);
the ONNX artifact must reproduce it. Written from the recipe, not from the artifact: nothing here
reads a quantised graph.
"""

from __future__ import annotations

from pathlib import Path

import torch
from molmoact_edge.export.checkpoint import load_model
from molmoact_edge.export.model import MolmoAct
from molmoact_edge.quantization.recipes import AwqRecipe, Fp8Recipe, FloatRecipe, SmoothQuantRecipe, WeightOnlyRecipe


def fake_quant_weight(w: torch.Tensor, bits: int, group: int, rule: str = "peak") -> torch.Tensor:
    """``w`` [out, in] -> the dequantised weight under the recipes' rounding rule ``rule`` (recipes.py:
    "peak" for the onnxruntime target, "absmax" for tensorrt): ``group`` consecutive inputs share a
    scale (the last group may be shorter), in float32."""
    if rule not in ("peak", "absmax"):
        raise ValueError(f"unknown weight rule {rule!r}; accepted: 'peak' (onnxruntime), 'absmax' (tensorrt)")
    out_f, k = w.shape
    zp = 2 ** (bits - 1)
    w = w.float()
    res = torch.empty_like(w)
    for s in range(0, k, group):
        blk = w[:, s:s + group]
        if rule == "absmax":
            scale = blk.abs().amax(dim=1, keepdim=True) / (zp - 1)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            res[:, s:s + group] = torch.clamp(torch.round(blk / scale), 1 - zp, zp - 1) * scale
            continue
        hi, lo = blk.max(dim=1, keepdim=True).values, blk.min(dim=1, keepdim=True).values
        peak = torch.where(hi.abs() > lo.abs(), hi, lo)
        scale = peak / -zp
        inv = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, torch.ones_like(scale)),
                          torch.zeros_like(scale))
        code = torch.clamp(torch.floor(blk * inv + zp + 0.5), 0, 2 * zp - 1)
        res[:, s:s + group] = (code - zp) * scale
    return res


def llm_linears(model: MolmoAct) -> dict[str, torch.nn.Linear]:
    """Every linear layer of the language model by its parameter prefix (transformer layers, lm_head)."""
    out = {}
    for i, block in enumerate(model.model.transformer.blocks):
        for name, mod in (("self_attn.att_proj", block.self_attn.att_proj), ("self_attn.attn_out", block.self_attn.attn_out),
                          ("mlp.ff_proj", block.mlp.ff_proj), ("mlp.ff_out", block.mlp.ff_out)):
            out[f"transformer.blocks.{i}.{name}"] = mod
    out["lm_head"] = model.lm_head
    return out


@torch.no_grad()
def apply_recipe(model: MolmoAct, recipe: WeightOnlyRecipe) -> MolmoAct:
    """Replace the LLM's linear weights with their fake-quantised values, in place."""
    for name, lin in llm_linears(model).items():
        r = recipe.head_recipe() if name == "lm_head" else recipe
        k = lin.weight.shape[1]
        lin.weight.copy_(fake_quant_weight(lin.weight, r.bits, r.group_for(k), r.scale_rule).to(lin.weight.dtype))
    return model


def fake_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantise to float8 e4m3fn (round to nearest even, saturating at +-448) and back."""
    q = torch.clamp(x.float() / scale, -Fp8Recipe.FP8_MAX, Fp8Recipe.FP8_MAX).to(torch.float8_e4m3fn)
    return q.float() * scale


def fp8_weight_scales(w: torch.Tensor) -> torch.Tensor:
    """[out, in] -> one scale per output channel, amax / 448 (1 where a channel is all zero)."""
    amax = w.float().abs().amax(dim=1)
    return torch.where(amax > 0, amax / Fp8Recipe.FP8_MAX, torch.ones_like(amax))


@torch.no_grad()
def apply_fp8(model: MolmoAct, recipe: Fp8Recipe) -> MolmoAct:
    """Fake-quantise the transformer layers' weights and (through a pre-hook) their inputs."""
    for name, lin in llm_linears(model).items():
        if name == "lm_head":
            continue
        lin.weight.copy_(fake_fp8(lin.weight, fp8_weight_scales(lin.weight)[:, None]))
        scale = torch.tensor(recipe.amax_of(name), dtype=torch.float32) / Fp8Recipe.FP8_MAX
        lin.register_forward_pre_hook(lambda _m, args, s=scale: (fake_fp8(args[0], s).to(args[0].dtype), *args[1:]))
    return model


def int8_channel_scales(w: torch.Tensor) -> torch.Tensor:
    """[out, in] -> one symmetric INT8 scale per output channel, onnxruntime's quantiser's rule:
    (2 absmax) / 254 computed in float64, stored as float32 (1 where a channel is all zero)."""
    amax = w.float().abs().amax(dim=1).double()
    scale = (2 * amax / 254).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def int8_weight_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (codes round(w / scale) (float32 division, ties to even) clipped to [-127, 127],
    as float; the per-channel scales)."""
    scale = int8_channel_scales(w)
    return torch.clamp(torch.round(w.float() / scale[:, None]), -127, 127), scale


def fake_int8_weight(w: torch.Tensor) -> torch.Tensor:
    codes, scale = int8_weight_codes(w)
    return codes * scale[:, None]


class StaticInt8Linear(torch.nn.Module):
    """A W8A8 linear as INT8 kernels compute it (onnxruntime's MatMulIntegerToFloat, TensorRT's INT8
    GEMM): input codes q = clip(round(x / s_x) + zp) - zp (ties to even), weight codes c per output
    channel, the integer product q c^T summed exactly, then one float32 multiply by s_x * s_w and the
    bias. Summing the dequantised floats instead rounds at every partial sum, and the quantiser of the
    next layer turns those ulps into whole steps (measured: onnxruntime's outputs agree bit for bit with
    this form, in ~25% of elements with the dequantised float product)."""

    def __init__(self, lin: torch.nn.Linear, scale: float, zero_point: int, qmin: int, qmax: int):
        super().__init__()
        codes, w_scale = int8_weight_codes(lin.weight)
        # float64 holds every sum exactly: |q c| <= 255 * 127 < 2^15, so K up to 2^38 terms
        self.register_buffer("codes", codes.double())
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("multiplier", self.scale * w_scale)
        self.bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.detach().float().clone(), requires_grad=False)
        self.zero_point, self.qmin, self.qmax = int(zero_point), int(qmin), int(qmax)
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x.float() / self.scale) + self.zero_point, self.qmin, self.qmax) - self.zero_point
        y = torch.matmul(q.double(), self.codes.T).float() * self.multiplier
        return (y if self.bias is None else y + self.bias).to(x.dtype)


@torch.no_grad()
def apply_smoothquant(model: MolmoAct, recipe: SmoothQuantRecipe) -> MolmoAct:
    """Fold the recipe's smoothing scales, then replace each transformer-layer linear by its INT8 form
    (:class:`StaticInt8Linear`: INT8 weights per channel, static per-tensor input with the recipe's own
    scale and zero point)."""
    from molmoact_edge.quantization.folding import fold_scales

    fold_scales(model, recipe.smooth)
    for name, lin in llm_linears(model).items():
        if name == "lm_head":
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.model.get_submodule(parent), attr, StaticInt8Linear(lin, *recipe.act_quant[name]))
    return model


def simulated_model(checkpoint: str | Path, recipe) -> MolmoAct:
    """The reference model as the recipe defines it (fp16: the model in fp16). A quantised model
    attends in the exported graph's float order (graph_order.py: a static quantiser turns ulps into steps)."""
    from molmoact_edge.quantization.graph_order import attend_as_graph

    if isinstance(recipe, FloatRecipe):
        return load_model(checkpoint, torch.float16)
    if isinstance(recipe, WeightOnlyRecipe):
        return attend_as_graph(apply_recipe(load_model(checkpoint, torch.float32), recipe))
    if isinstance(recipe, Fp8Recipe):
        return attend_as_graph(apply_fp8(load_model(checkpoint, torch.float32), recipe))
    if isinstance(recipe, SmoothQuantRecipe):
        return attend_as_graph(apply_smoothquant(load_model(checkpoint, torch.float32), recipe))
    if isinstance(recipe, AwqRecipe):
        from molmoact_edge.quantization.folding import fold_scales

        return attend_as_graph(apply_recipe(fold_scales(load_model(checkpoint, torch.float32), recipe.smooth), recipe.weights))
    raise TypeError(f"no simulation for recipe {type(recipe).__name__}")
