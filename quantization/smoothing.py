"""Per-input-channel scales folded into the model (torch side): SmoothQuant and AWQ both rewrite
a linear y = W x as y = (W diag(s)) (x / s), multiplying the weight's columns by s and dividing
whatever produces x by s, so the float model computes the same function and only what the
quantiser sees changes.

Which linears are scaled, and where 1/s goes (every fold is exact in float arithmetic's sense):

- ``self_attn.att_proj`` (q|k|v): into ``attn_norm``'s weight (an RMSNorm multiplies per channel).
- ``mlp.ff_proj`` (up|gate): into ``ff_norm``'s weight.
- ``mlp.ff_out``: its input is act(gate) * up, linear in up: into the up rows of ``ff_proj``.
- ``self_attn.attn_out``: its input channel (head h, dim d) is softmax-weighted v of KV head
  h // (heads / kv_heads), dim d: into that v row of ``att_proj`` (and its bias). Under GQA several
  query heads read one v row, so s must be equal across the heads of a group: the statistic is
  tied over the group (max for SmoothQuant, mean for AWQ) before s is computed.
- ``lm_head`` is not scaled: the recipes keep it float (w8a8-sq) or plain RTN (int4-awq).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from molmoact_edge.export.model import MolmoAct
from molmoact_edge.quantization.fake_quant import fake_quant_weight, llm_linears
from molmoact_edge.quantization.folding import FOLDED_INTO, _attn_geometry, fold_scales  # noqa: F401 (re-exported)

def smoothed_layers(model: MolmoAct) -> list[str]:
    return [name for name in llm_linears(model) if name != "lm_head"]


def tie_gqa(x: np.ndarray, heads: int, kv_heads: int, reduce: str) -> np.ndarray:
    """[heads * head_dim] per-channel statistic -> the same, equal across the query heads sharing a KV head."""
    per_head = x.reshape(kv_heads, heads // kv_heads, -1)
    tied = per_head.max(axis=1) if reduce == "max" else per_head.mean(axis=1)
    return np.repeat(tied[:, None, :], heads // kv_heads, axis=1).reshape(-1)


def _weight_column_max(lin: torch.nn.Linear) -> np.ndarray:
    return lin.weight.detach().float().abs().amax(dim=0).numpy()


def smoothquant_scales(model: MolmoAct, channel_amax: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); 1 where either side is 0 (nothing to migrate)."""
    heads, kv_heads = _attn_geometry(model)
    out = {}
    for name, lin in llm_linears(model).items():
        if name == "lm_head":
            continue
        x, w = channel_amax[name].astype(np.float64), _weight_column_max(lin).astype(np.float64)
        if name.endswith("attn_out"):
            x, w = tie_gqa(x, heads, kv_heads, "max"), tie_gqa(w, heads, kv_heads, "max")
        ok = (x > 0) & (w > 0)
        s = np.ones_like(x)
        s[ok] = x[ok] ** alpha / w[ok] ** (1 - alpha)
        out[name] = np.clip(s, 1e-5, 1e5).astype(np.float32)
    return out


def layer_output_error(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor | None, bits: int, group: int,
                       rule: str = "peak") -> float:
    """|| Q(W diag(s)) (x / s) - W x ||^2 summed over the rows of ``x`` (s = None: plain RTN); Q under
    the target's weight rule ``rule`` (recipes.py), so the search scores what the artifact stores."""
    ref = x @ w.T
    ws = w if s is None else w * s[None, :]
    xs = x if s is None else x / s[None, :]
    return float(((xs @ fake_quant_weight(ws, bits, group, rule).T - ref) ** 2).sum())


def awq_candidate(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s = mean|X|^alpha, normalised to geometric centre 1 (as AWQ does) so weights keep their range."""
    m = np.maximum(mean_abs.astype(np.float64), 1e-8)
    s = m ** alpha
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


@torch.no_grad()
def awq_search(model: MolmoAct, channel_mean: dict[str, np.ndarray], rows: dict[str, np.ndarray], bits: int,
               group_for: Callable[[int], int], grid: int,
               progress: Callable[[str], None] | None = None, rule: str = "peak") -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per transformer-layer linear, the alpha in {0, 1/grid, ..., 1} whose scales minimise the
    quantised layer's output error on the calibration rows; returns (layer -> s, layer -> alpha)."""
    heads, kv_heads = _attn_geometry(model)
    scales, alphas = {}, {}
    names = smoothed_layers(model)
    for n, name in enumerate(names):
        lin = llm_linears(model)[name]
        w, x = lin.weight.detach().float(), torch.from_numpy(rows[name]).float()
        mean = channel_mean[name]
        if name.endswith("attn_out"):
            mean = tie_gqa(mean, heads, kv_heads, "mean")
        best = (layer_output_error(w, x, None, bits, group_for(w.shape[1]), rule), 0.0, np.ones(w.shape[1], np.float32))
        rtn = best[0]
        for a in range(1, grid + 1):
            s = awq_candidate(mean, a / grid)
            err = layer_output_error(w, x, torch.from_numpy(s), bits, group_for(w.shape[1]), rule)
            if err < best[0]:
                best = (err, a / grid, s)
        scales[name], alphas[name] = best[2], best[1]
        if progress:
            progress(f"AWQ {n + 1}/{len(names)} {name}: alpha {best[1]:.2f}, output error "
                     f"{best[0] / rtn if rtn else 1.0:.3f}x RTN's")
    return scales, alphas


def summarise(scales: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per layer min / median / max of s: the manifest's summary (the full vectors live in a side file)."""
    return {k: {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
            for k, v in sorted(scales.items())}
