"""Shared by the draft tests: run one generation with or without a draft, and compare its ids with
plain greedy decoding, telling a near-tie of the engine from a wrong acceptance."""

from __future__ import annotations

import warnings

import numpy as np
from molmoact_edge.runtime.engine.constrain import mask_logits
from molmoact_edge.runtime.engine.generate import NEAR_TIE_TOLERANCE, generate


def run(pipe, inputs, max_new: int, grammar=None, draft=None, ngram: bool = False, **options):
    """One generation on ``pipe``'s backend; ``grammar`` an OutputGrammar or None."""
    state = grammar.start(max_tokens=max_new) if grammar is not None else None
    drafter = pipe.drafter(draft, ngram, **options)
    return generate(pipe.backend, inputs, pipe.spec.tokenizer.special.eos, max_new, grammar_state=state,
                    drafter=drafter)


def top2_gap(pipe, inputs, ids: list[int], at: int, max_new: int, grammar=None) -> float:
    """The gap between the two best (allowed) logits at position ``at`` of the plain answer ``ids``,
    replayed one token per forward as plain decoding ran it."""
    be = pipe.backend
    feats = be.vision(inputs.vision.crops, inputs.vision.pooled_patches_idx)
    be.reset(len(inputs.input_ids) + max_new)
    logits = be.forward(inputs.input_ids, 0, image_features=feats)[-1]
    state = grammar.start(max_tokens=max_new) if grammar is not None else None
    pos = len(inputs.input_ids)
    for t in ids[:at]:
        logits = be.forward(np.array([t], dtype=np.int64), pos)[-1]
        pos += 1
        if state is not None:
            state.advance(t)
    row = mask_logits(logits, state) if state is not None else logits
    best = np.sort(row[np.isfinite(row)])[-2:]
    return float(best[1] - best[0]) if best.size == 2 else float("inf")


def assert_same_ids(pipe, inputs, plain: list[int], got: list[int], max_new: int, grammar=None, what: str = ""):
    """``got`` must be ``plain``; a difference is tolerated only at a near-tie (top-2 gap below
    NEAR_TIE_TOLERANCE), and then reported with its position and gap."""
    if got == plain:
        return
    at = next((i for i, (a, b) in enumerate(zip(plain, got)) if a != b), min(len(plain), len(got)))
    if at >= min(len(plain), len(got)):
        raise AssertionError(f"{what}: drafted answer has {len(got)} ids, plain {len(plain)}, same up to the shorter")
    gap = top2_gap(pipe, inputs, plain, at, max_new, grammar)
    assert gap < NEAR_TIE_TOLERANCE, (f"{what}: ids differ at position {at} (plain {plain[at]}, drafted {got[at]}) "
                                      f"where the top-2 logit gap is {gap:.3g} >= {NEAR_TIE_TOLERANCE}: not a "
                                      "near-tie, the acceptance logic chose a token greedy decoding would not")
    warnings.warn(f"{what}: near-tie flip at position {at}: top-2 gap {gap:.3g} < {NEAR_TIE_TOLERANCE}", stacklevel=2)
