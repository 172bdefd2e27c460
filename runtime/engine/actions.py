"""Action strings -> vocabulary ids -> bins -> normalised values -> de-normalised actions.

MolmoAct writes each action dimension as the byte-level spelling of one of the last
``n_action_bins`` entries of the base vocabulary (MOLMOACT.md section 8). This module holds the
numeric half of reading them, exactly as the official ``parse_action`` does it, so that the text
parser and the grammar-driven decode loop produce bit-identical values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from molmoact_edge.runtime.engine.config import ActionStats, ConfigError, ModelConfig


@dataclass(frozen=True)
class ActionDecoder:
    """Official-equivalent decoding of action strings for one checkpoint and one unnorm key.

    ``stats`` None means "do not de-normalise" (values stay in [-1, 1]); the grammar uses that when
    the caller has not chosen a dataset.
    """

    base_vocab: Mapping[str, int] = field(repr=False)
    base_vocab_size: int
    n_action_bins: int = 256
    stats: ActionStats | None = None
    unnorm_key: str | None = None

    def __post_init__(self):
        if not isinstance(self.n_action_bins, int) or self.n_action_bins < 2:
            raise ConfigError(f"field 'n_action_bins' must be an integer >= 2, got {self.n_action_bins!r}")
        if not isinstance(self.base_vocab_size, int) or self.base_vocab_size <= self.n_action_bins:
            raise ConfigError(f"field 'base_vocab_size' must exceed n_action_bins ({self.n_action_bins}), "
                              f"got {self.base_vocab_size!r}")
        if len(self.base_vocab) != self.base_vocab_size:
            raise ConfigError(f"field 'base_vocab' has {len(self.base_vocab)} entries but base_vocab_size is "
                              f"{self.base_vocab_size}; pass the tokenizer's vocabulary without added tokens")

    @classmethod
    def from_checkpoint(cls, config: ModelConfig, tokenizer, unnorm_key: str | None = None,
                        denormalize: bool = True) -> ActionDecoder:
        """``unnorm_key`` picks the dataset statistics; an unknown key raises ConfigError listing the
        available ones. ``denormalize=False`` keeps normalised values (no key needed)."""
        stats = None
        if denormalize:
            unnorm_key = config.resolve_unnorm_key(unnorm_key)
            stats = config.norm_stats[unnorm_key]
        vocab = tokenizer.rust.get_vocab(with_added_tokens=False)
        return cls(base_vocab=vocab, base_vocab_size=tokenizer.special.base_vocab_size,
                   n_action_bins=config.n_action_bins, stats=stats, unnorm_key=unnorm_key)

    # -- the action table ---------------------------------------------------------------------
    @property
    def first_action_id(self) -> int:
        """Lowest id of the action strings (bin n_action_bins-1); the highest is base_vocab_size-1."""
        return self.base_vocab_size - self.n_action_bins

    def action_ids(self) -> np.ndarray:
        """Ids of the action strings in rank order: entry r is id base_vocab_size-1-r."""
        return self.base_vocab_size - 1 - np.arange(self.n_action_bins, dtype=np.int64)

    @property
    def bin_centers(self) -> np.ndarray:
        edges = np.linspace(-1.0, 1.0, self.n_action_bins)
        return (edges[:-1] + edges[1:]) / 2.0

    # -- decoding -----------------------------------------------------------------------------
    def ids_from_strings(self, strings: Sequence[str]) -> np.ndarray:
        # The official Qwen2Tokenizer returns None for a string outside its vocabulary and the
        # caller substitutes vocab_size; added tokens (ids >= base size) land in the same bin.
        return np.asarray([self.base_vocab.get(s, self.base_vocab_size) for s in strings], dtype=np.int64)

    def bins_from_ids(self, ids) -> np.ndarray:
        """Official discretisation: clip(base_vocab_size - id - 1, 0, n_bins - 2). The highest rank
        (n_bins - 1) shares the last bin centre, and anything outside the table becomes bin 0."""
        ids = np.asarray(ids, dtype=np.int64)
        return np.clip(self.base_vocab_size - ids - 1, 0, self.n_action_bins - 2)

    def normalized_from_bins(self, bins) -> np.ndarray:
        return self.bin_centers[np.asarray(bins, dtype=np.int64)]

    def denormalize(self, normalized) -> np.ndarray:
        """q01/q99 de-normalisation where the mask is set; the last (gripper) dimension never.

        The official code holds q01/q99 as float32 and the bin centres as float64; the arithmetic
        below keeps that mix so the results match it bit for bit."""
        normalized = np.asarray(normalized, dtype=np.float64)
        if self.stats is None:
            return normalized.copy()
        dim = self.stats.action_dim
        if normalized.shape[-1] != dim:
            raise ValueError(f"actions have {normalized.shape[-1]} dimensions but norm_stats[{self.unnorm_key!r}] "
                             f"has {dim}; choose the unnorm key of the dataset this checkpoint was trained on")
        q01 = self.stats.q01.astype(np.float32)
        q99 = self.stats.q99.astype(np.float32)
        mask = self.stats.mask.astype(bool).copy()
        mask[-1] = False
        unnorm = 0.5 * (normalized + 1.0) * (q99 - q01) + q01
        return np.where(mask, unnorm, normalized)

    def decode_strings(self, strings: Sequence[str]) -> np.ndarray:
        """One action list (strings as written by the model) -> values, as the official parser."""
        return self.denormalize(self.normalized_from_bins(self.bins_from_ids(self.ids_from_strings(strings))))

    def decode_ids(self, ids) -> np.ndarray:
        return self.denormalize(self.normalized_from_bins(self.bins_from_ids(ids)))

    def is_action_string(self, s: str) -> bool:
        i = self.base_vocab.get(s)
        return i is not None and self.first_action_id <= i < self.base_vocab_size
