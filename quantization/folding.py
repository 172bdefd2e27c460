"""Folding per-input-channel scales into the model (torch side): y = W x becomes (W diag(s)) (x / s),
the weight's columns times s and whatever produces x divided by s (smoothing.py says where and why).
Kept apart from the scale searches so that the simulation (fake_quant.py) can fold without importing them."""

from __future__ import annotations

import numpy as np
import torch
from molmoact_edge.export.model import MolmoAct

FOLDED_INTO = {"self_attn.att_proj": "attn_norm weight", "mlp.ff_proj": "ff_norm weight",
               "mlp.ff_out": "ff_proj up rows", "self_attn.attn_out": "att_proj v rows (tied over each GQA group)"}


def _attn_geometry(model: MolmoAct) -> tuple[int, int]:
    c = model.config.llm
    return c.num_attention_heads, c.num_key_value_heads


@torch.no_grad()
def fold_scales(model: MolmoAct, scales: dict[str, np.ndarray]) -> MolmoAct:
    """Apply ``scales`` (layer -> s over its input channels) in place; layers not named keep s = 1."""
    heads, kv_heads = _attn_geometry(model)
    for i, block in enumerate(model.model.transformer.blocks):
        pre = f"transformer.blocks.{i}."
        attn, mlp = block.self_attn, block.mlp
        for name, lin in (("self_attn.att_proj", attn.att_proj), ("mlp.ff_proj", mlp.ff_proj),
                          ("mlp.ff_out", mlp.ff_out), ("self_attn.attn_out", attn.attn_out)):
            if pre + name not in scales:
                continue
            s = torch.from_numpy(np.asarray(scales[pre + name], dtype=np.float32))
            if s.shape != (lin.in_features,) or not bool((s > 0).all()):
                raise ValueError(f"scales for {pre + name} must be {lin.in_features} positive values")
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
            if name == "self_attn.att_proj":
                block.attn_norm.weight.div_(s.to(block.attn_norm.weight.dtype))
            elif name == "mlp.ff_proj":
                block.ff_norm.weight.div_(s.to(block.ff_norm.weight.dtype))
            elif name == "mlp.ff_out":
                mlp.ff_proj.weight[: lin.in_features].div_(s.to(mlp.ff_proj.weight.dtype)[:, None])  # rows [up | gate]
            else:
                per_kv = s.reshape(kv_heads, heads // kv_heads, -1)
                if not bool((per_kv == per_kv[:, :1]).all()):
                    raise ValueError(f"scales for {pre + name} differ within a GQA group; tie them (tie_gqa)")
                v = per_kv[:, 0].reshape(-1)
                start = attn.split[0] + attn.split[1]
                attn.att_proj.weight[start:].div_(v.to(attn.att_proj.weight.dtype)[:, None])
                if attn.att_proj.bias is not None:
                    attn.att_proj.bias[start:].div_(v.to(attn.att_proj.bias.dtype))
    return model
