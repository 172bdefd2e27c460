"""What the decode loop needs from an inference engine (torch reference, onnxruntime, TensorRT).

A backend owns the weights and the KV cache. The loop hands it token ids and a position; the
backend embeds them (adding image features at ``<im_patch>`` positions during prefill), runs the
LLM for those k tokens (k = prompt length for prefill, 1 for decode, k for a forced span or a
verification) and returns logits only for the rows asked for.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    name: str

    def vision(self, crops: np.ndarray, pooled_patches_idx: np.ndarray) -> np.ndarray:
        """float32 crops [n_crops, patches, pixels] + int64 pooling map [n_tokens, 4] -> image
        features [n_tokens, hidden] (float32), one row per ``<im_patch>`` token in prompt order."""

    def reset(self, max_seq_len: int) -> None:
        """Prepare an empty KV cache that holds at least ``max_seq_len`` positions."""

    def forward(self, token_ids: np.ndarray, start_pos: int, image_features: np.ndarray | None = None,
                logits_rows: np.ndarray | None = None) -> np.ndarray:
        """Run ``token_ids`` (int64 [k]) at positions start_pos..start_pos+k-1, writing their keys and
        values into the cache. Returns float32 logits [len(logits_rows), vocab] for the requested rows
        (indices into the k tokens; default: only the last)."""

    def close(self) -> None:
        """Release the engine's resources."""
