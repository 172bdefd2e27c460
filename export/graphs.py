"""The exportable graphs: pure functions of their inputs around the reference model's weights.

``VisionGraph``: crops + pooling map -> one projected feature row per pooling group (the host drops
groups without any valid patch, a data-dependent shape that graphs handle badly).

``LlmGraph``: one graph for prefill (q = prompt length, no past), decode (q = 1) and multi-token
verification (q = k). The KV cache is position-major, ``[positions, layers, 2 (k|v), kv_heads,
head_dim]``, so that the filled prefix the graph reads (``past_kv``) and the rows it produces
(``new_kv``) are contiguous slices of ONE preallocated host buffer: the runtime binds them in
place and nothing is concatenated or copied per token on the host. Logits are computed only for
the rows listed in ``logits_index`` (a 950-token prefill needs one row, not 950 x vocab).

``StaticLlmGraph``: the same computation over the WHOLE preallocated cache (``kv_cache``
[max_seq_len, ...], same position-major layout), with the position as an input and the unfilled
rows masked inside the graph. No input dimension depends on how far generation has got, so a GPU
engine can capture one decode step (q = 1) in a CUDA graph and replay it for every token. It
returns only the new rows (``new_kv``), which the runtime writes in place, as for ``LlmGraph``.
"""

from __future__ import annotations

import torch
from molmoact_edge.export.model import MolmoAct, rope_tables
from torch import nn


class VisionGraph(nn.Module):
    def __init__(self, model: MolmoAct):
        super().__init__()
        self.backbone = model.model.vision_backbone

    def forward(self, crops: torch.Tensor, pooled_patches_idx: torch.Tensor) -> torch.Tensor:
        """float32 I/O whatever the weights' dtype, so callers never convert pixels or features."""
        return self.backbone.pooled_features(crops, pooled_patches_idx).float()


class LlmGraph(nn.Module):
    def __init__(self, model: MolmoAct):
        super().__init__()
        self.cfg = model.config.llm
        self.transformer = model.model.transformer
        self.lm_head = model.lm_head

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, past_kv: torch.Tensor,
                logits_index: torch.Tensor):
        """inputs_embeds [1, q, H], position_ids [q] (int64), past_kv [P, L, 2, kvh, hd],
        logits_index [r] (int64, rows of the q tokens) -> logits [r, vocab] (float32), new_kv [q, L, 2, kvh, hd]."""
        n_past = past_kv.shape[0]
        key_pos = torch.cat([torch.arange(n_past, device=position_ids.device), position_ids])
        mask = key_pos[None, :] <= position_ids[:, None]
        return self._run(inputs_embeds, position_ids, past_kv, mask, logits_index)

    def _run(self, inputs_embeds, position_ids, past_kv, mask, logits_index):
        """The blocks over ``past_kv`` (all its rows, masked by ``mask`` [q, rows + q]) and the q new tokens."""
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.rope_theta, position_ids)
        new = []

        def past_concat(i: int):
            # the layer's past from the position-major buffer, the new rows kept for new_kv
            def store(k, v):
                new.append(torch.stack([k[0], v[0]], dim=0))  # [2, kvh, q, hd]
                past_k = past_kv[:, i, 0].permute(1, 0, 2)[None].to(k.dtype)
                past_v = past_kv[:, i, 1].permute(1, 0, 2)[None].to(v.dtype)
                return torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)

            return store

        x = self.transformer.run(inputs_embeds, cos, sin, mask, past_concat)
        logits = self.lm_head(x[0].index_select(0, logits_index))
        new_kv = torch.stack(new, dim=0).permute(3, 0, 1, 2, 4)  # [q, L, 2, kvh, hd]
        return logits.float(), new_kv.to(past_kv.dtype)


class StaticLlmGraph(LlmGraph):
    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, kv_cache: torch.Tensor,
                logits_index: torch.Tensor):
        """inputs_embeds [1, q, H], position_ids [q] (int64, consecutive), kv_cache [max_seq_len, L, 2, kvh, hd]
        (rows before position_ids[0] filled; the rest, stale or zero, are masked out), logits_index [r]
        -> logits [r, vocab] (float32), new_kv [q, L, 2, kvh, hd]."""
        rows = torch.arange(kv_cache.shape[0], device=position_ids.device)
        filled = rows[None, :] < position_ids[:1, None]  # [1, max_seq_len]
        causal = position_ids[None, :] <= position_ids[:, None]  # [q, q] among the new tokens
        mask = torch.cat([filled.expand(causal.shape[0], -1), causal], dim=1)
        return self._run(inputs_embeds, position_ids, kv_cache, mask, logits_index)
