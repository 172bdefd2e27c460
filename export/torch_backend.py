"""The torch reference as a runtime backend, so that the reference and the deployed engines run
the very same decode loop (runtime/engine/generate.py).

On CUDA the one-token decode step runs through :class:`StaticDecode`: the whole static cache with
the position as a device tensor and the mask computed from it, so the step has fixed shapes and no
host synchronisation and is captured once in a CUDA graph, then replayed per token (the measured
GPU path: benchmarks/gpu_step.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from molmoact_edge.export.checkpoint import load_model
from molmoact_edge.export.model import MolmoAct, rope_tables
from molmoact_edge.runtime.engine.pipeline import ModelSpec, Pipeline


class StaticDecode:
    """One decode token against the model's whole static cache: token id and position live in device
    tensors that the host rewrites before each call; the cache rows past the position are masked,
    the new K/V written in place with ``index_copy_``. Nothing depends on host values, so
    :meth:`capture` can record the step in a CUDA graph."""

    def __init__(self, model: MolmoAct):
        self.model = model
        dev = model.lm_head.weight.device
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.rows = torch.arange(model.max_seq_len, device=dev)
        self.graph, self.logits = None, None

    def _step(self) -> torch.Tensor:
        m, cfg = self.model, self.model.config.llm
        x = m.model.transformer.wte(self.ids)
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, self.pos)
        mask = (self.rows <= self.pos)[None, :]  # [1 query, max_seq_len keys]: the new token sees itself

        def layer(i):
            kc, vc = m.k_cache[i], m.v_cache[i]

            def store(k, v):
                kc.index_copy_(2, self.pos, k.to(kc.dtype))
                vc.index_copy_(2, self.pos, v.to(vc.dtype))
                return kc, vc

            return store

        h = m.model.transformer.run(x, cos, sin, mask, layer)
        return m.lm_head(h[0, -1:]).float()

    def capture(self, warmup: int = 2) -> None:
        """Record the step (CUDA only). The warm-up runs repeat the step at the current id and position,
        so the cache rows they write are the ones the step writes anyway."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        self.ids.fill_(int(token))
        self.pos.fill_(int(pos))
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._step()


class TorchBackend:
    name = "torch"

    def __init__(self, model: MolmoAct, device: str | torch.device = "cpu", static_decode: bool | None = None,
                 cuda_graph: bool | None = None):
        """``static_decode``: decode through :class:`StaticDecode` (default: on CUDA); ``cuda_graph``:
        capture it (default: on CUDA)."""
        self.model = model
        self.device = torch.device(device)
        self.dtype = model.lm_head.weight.dtype
        on_cuda = self.device.type == "cuda"
        self.static_decode = on_cuda if static_decode is None else static_decode
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        if self.cuda_graph and not (on_cuda and self.static_decode):
            raise ValueError("cuda_graph needs a CUDA device and static_decode")
        self.static: StaticDecode | None = None

    @torch.inference_mode()
    def vision(self, crops: np.ndarray, pooled_patches_idx: np.ndarray) -> np.ndarray:
        feats = self.model.image_features(torch.from_numpy(np.ascontiguousarray(crops)).to(self.device),
                                          torch.from_numpy(np.ascontiguousarray(pooled_patches_idx)).to(self.device))
        return feats.float().cpu().numpy()

    def reset(self, max_seq_len: int) -> None:
        if self.model.max_seq_len < max_seq_len:
            self.model.setup_cache(max_seq_len)
            self.static = None  # bound to the old cache: rebuilt (and recaptured) on the next decode
        # Stale entries past the write position are masked out, so the cache needs no clearing.

    @torch.inference_mode()
    def forward(self, token_ids: np.ndarray, start_pos: int, image_features: np.ndarray | None = None,
                logits_rows: np.ndarray | None = None) -> np.ndarray:
        ids_np = np.asarray(token_ids, dtype=np.int64)
        one_row = logits_rows is None or list(np.asarray(logits_rows).ravel()) == [0]
        if self.static_decode and len(ids_np) == 1 and image_features is None and one_row:
            if self.model.max_seq_len <= start_pos:
                raise ValueError(f"position {start_pos} is past the KV cache ({self.model.max_seq_len}); call reset first")
            if self.static is None:
                self.static = StaticDecode(self.model)
                if self.cuda_graph:
                    self.static.ids.fill_(int(ids_np[0]))
                    self.static.pos.fill_(start_pos)
                    self.static.capture()
            return self.static(int(ids_np[0]), start_pos).cpu().numpy()
        ids = torch.as_tensor(ids_np, device=self.device)[None]
        feats = None if image_features is None else torch.from_numpy(image_features).to(self.device)
        rows = None if logits_rows is None else torch.as_tensor(np.asarray(logits_rows), device=self.device)
        logits = self.model(self.model.embed(ids, feats), start_pos, rows)
        return logits.float().cpu().numpy()

    def close(self) -> None:
        self.static = None
        self.model.k_cache = self.model.v_cache = None


def open_checkpoint(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> Pipeline:
    """A ready :class:`Pipeline` over the torch reference of a Hugging Face checkpoint folder: the
    same steps (``act``, ``step``) as a bundle's."""
    spec = ModelSpec.load(checkpoint_dir)
    return Pipeline(spec, TorchBackend(load_model(checkpoint_dir, dtype, device), device))
