"""The torch reference as a runtime backend, so that the reference and the deployed engines run
the very same decode loop (runtime/engine/generate.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from molmoact_edge.export.checkpoint import load_model
from molmoact_edge.export.model import MolmoAct
from molmoact_edge.runtime.engine.pipeline import ModelSpec, Pipeline


class TorchBackend:
    name = "torch"

    def __init__(self, model: MolmoAct, device: str | torch.device = "cpu"):
        self.model = model
        self.device = torch.device(device)
        self.dtype = model.lm_head.weight.dtype

    @torch.inference_mode()
    def vision(self, crops: np.ndarray, pooled_patches_idx: np.ndarray) -> np.ndarray:
        feats = self.model.image_features(torch.from_numpy(np.ascontiguousarray(crops)).to(self.device),
                                          torch.from_numpy(np.ascontiguousarray(pooled_patches_idx)).to(self.device))
        return feats.float().cpu().numpy()

    def reset(self, max_seq_len: int) -> None:
        if self.model.max_seq_len < max_seq_len:
            self.model.setup_cache(max_seq_len)
        # Stale entries past the write position are masked out, so the cache needs no clearing.

    @torch.inference_mode()
    def forward(self, token_ids: np.ndarray, start_pos: int, image_features: np.ndarray | None = None,
                logits_rows: np.ndarray | None = None) -> np.ndarray:
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=self.device)[None]
        feats = None if image_features is None else torch.from_numpy(image_features).to(self.device)
        rows = None if logits_rows is None else torch.as_tensor(np.asarray(logits_rows), device=self.device)
        logits = self.model(self.model.embed(ids, feats), start_pos, rows)
        return logits.float().cpu().numpy()

    def close(self) -> None:
        self.model.k_cache = self.model.v_cache = None


def open_checkpoint(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> Pipeline:
    """A ready :class:`Pipeline` over the torch reference of a Hugging Face checkpoint folder: the
    same steps (``act``, ``step``) as a bundle's."""
    spec = ModelSpec.load(checkpoint_dir)
    return Pipeline(spec, TorchBackend(load_model(checkpoint_dir, dtype, device), device))
