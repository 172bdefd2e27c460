"""Grammar-constrained decoding on logits: the logits processor every backend shares.

The torch reference converts its last logits row to numpy and calls these, so the reference
and the runtime backends apply one and the same constraint.
"""

from __future__ import annotations

import numpy as np
from molmoact_edge.runtime.engine.grammar import GrammarError, GrammarState


def mask_logits(logits: np.ndarray, state: GrammarState) -> np.ndarray:
    """A copy of ``logits`` with every token the grammar forbids set to -inf.

    ``logits`` is one output-vocabulary row [V] (or rows [n, V] sharing one state); V may be
    smaller than the tokenizer (input-only ids are never generated) but not larger."""
    logits = np.asarray(logits)
    if logits.ndim not in (1, 2) or not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(f"logits must be a float array [V] or [n, V], got {logits.dtype} {logits.shape}")
    v = logits.shape[-1]
    mask = state.allowed_mask()
    if v > mask.shape[0]:
        raise ValueError(f"logits have {v} entries but the tokenizer only {mask.shape[0]} ids")
    mask = mask[:v]
    if not mask.any():
        raise GrammarError(f"no token of the {v}-entry output vocabulary is allowed in '{state.phase_name}'")
    return np.where(mask, logits, np.array(-np.inf, dtype=logits.dtype))


def greedy_pick(logits: np.ndarray, state: GrammarState | None = None) -> int:
    """Argmax of one row; with a state, over the allowed ids only. Ties go to the lowest id, as
    ``np.argmax`` does, so when the unconstrained argmax is allowed both picks are the same."""
    logits = np.asarray(logits)
    if logits.ndim != 1:
        raise ValueError(f"greedy_pick takes one logits row [V], got shape {logits.shape}")
    best = int(np.argmax(logits))
    if state is None:
        return best
    if best < state.g.size and state.is_allowed(best):
        return best  # the usual case for a trained model, and exactly what the masked argmax gives
    ids = state.allowed_ids()
    ids = ids[ids < logits.shape[0]]
    if ids.size == 0:
        raise GrammarError(f"no token of the {logits.shape[0]}-entry output vocabulary is allowed in "
                           f"'{state.phase_name}'")
    # allowed_ids is ascending, so the first maximum (NaN counts as one, as in np.argmax) is the
    # lowest id among the best
    return int(ids[np.argmax(logits[ids])])
