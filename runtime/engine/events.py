"""Streaming events of the output grammar: each part of an answer as soon as it is fixed.

``GrammarState.advance`` returns them in the order they happen, so a caller can show the depth
map and preview the trace before the first action is executed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DepthComplete:
    """All depth codes, row-major over the depth grid; emitted with ``<DEPTH_END>``."""

    codes: tuple[int, ...]

    def __post_init__(self):
        if not self.codes or not all(isinstance(c, int) and c >= 0 for c in self.codes):
            raise ValueError(f"field 'codes' must be a non-empty tuple of non-negative ints, got {self.codes!r}")


@dataclass(frozen=True)
class TraceComplete:
    """Trace points (x, y) in 0..255 over the first image; ``steered`` when the caller forced it."""

    points: tuple[tuple[int, int], ...]
    steered: bool = False

    def __post_init__(self):
        if not self.points or not all(len(p) == 2 for p in self.points):
            raise ValueError(f"field 'points' must be a non-empty tuple of (x, y) pairs, got {self.points!r}")


@dataclass(frozen=True, eq=False)  # numpy fields: compare the arrays, not the events
class ActionComplete:
    """One action list, fixed once its last value is (the closing bracket is then certain).

    ``ids`` are the vocabulary ids of the action strings, ``bins`` the official discretisation
    (``clip(base_vocab_size - id - 1, 0, n_bins - 2)``), ``normalized`` the bin centres in
    [-1, 1] and ``values`` the de-normalised action (None when no unnorm key was chosen)."""

    index: int
    ids: tuple[int, ...]
    bins: np.ndarray
    normalized: np.ndarray
    values: np.ndarray | None = None

    def __post_init__(self):
        if self.index < 0:
            raise ValueError(f"field 'index' must be >= 0, got {self.index}")
        n = len(self.ids)
        for name in ("bins", "normalized") + (("values",) if self.values is not None else ()):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.shape != (n,):
                raise ValueError(f"field {name!r} must be a numpy array of shape ({n},), got {arr!r}")


@dataclass(frozen=True)
class Finished:
    """The end-of-sequence token was accepted; ``n_actions`` action lists were produced."""

    n_actions: int


Event = DepthComplete | TraceComplete | ActionComplete | Finished
