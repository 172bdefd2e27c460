"""The engine-agnostic generation loop: preprocessing -> vision -> prefill -> greedy decode.

With an output grammar, every step is masked to the tokens the grammar allows, and where the
grammar leaves exactly one continuation (glue text, ``<DEPTH_END>``, the tail of an action
string) the whole span is appended in ONE multi-token forward instead of one forward per token.
Without a grammar the loop is plain greedy decoding, identical to the official ``generate``.

With a :class:`~molmoact_edge.runtime.engine.drafts.Drafter` the loop decodes speculatively: the
tokens a draft source guesses (cut where the grammar forbids them, extended by what the grammar
then forces) are scored in the same forward as the tokens just decided, and the longest drafted
prefix that equals the loop's own greedy (grammar-masked) choice is kept, plus the one token the
model chose instead. Rejected rows leave keys and values past the accepted prefix in the cache;
the next forward writes its own at those positions, and no forward reads past its own end, so
nothing is copied or rolled back. The ids are those of plain greedy decoding, up to a near-tie
flipped by the different summation order of a k-token forward (see ``NEAR_TIE_TOLERANCE``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from molmoact_edge.runtime.engine.backend import Backend
from molmoact_edge.runtime.engine.constrain import greedy_pick
from molmoact_edge.runtime.engine.drafts import Drafter, DraftStats
from molmoact_edge.runtime.engine.prompt import ModelInputs


class NonFiniteError(RuntimeError):
    """The model produced NaN or infinite numbers (image features or logits). Greedy picking would
    turn them into some token all the same (``np.argmax`` takes NaN for the maximum), and from there
    into an action, so the step ends here instead: no answer, no action."""


def _check_finite(values: np.ndarray, what: str) -> None:
    # np.isfinite over one logits row (152k floats) is a few tens of microseconds: cheap next to a forward.
    if not np.isfinite(values).all():
        bad = values[~np.isfinite(values)]
        kinds = " and ".join(k for k, hit in (("NaN", np.isnan(bad).any()), ("inf", np.isinf(bad).any())) if hit)
        raise NonFiniteError(f"the model produced {kinds} in {what} ({bad.size} of {values.size} values); "
                             "the weights or the engine are damaged (re-export the bundle, check the checkpoint "
                             "and the backend): no action is taken from this step")


@dataclass
class GenerationResult:
    token_ids: list[int]
    prompt_tokens: int
    timings_ms: dict[str, float]
    forwards: int  # sequential LLM forwards after prefill
    forced_tokens: int  # tokens appended from grammar-forced spans (no decision needed)
    stopped: str  # "eos", "max_new_tokens" or "grammar_complete"
    events: list[Any] = field(default_factory=list)
    drafts: DraftStats = field(default_factory=DraftStats)  # drafted / accepted tokens (none without a drafter)

    @property
    def tokens_per_s(self) -> float:
        t = self.timings_ms.get("decode", 0.0)
        return len(self.token_ids) / (t / 1000.0) if t > 0 else float("nan")


# A k-token forward sums in another order than k one-token forwards, so its logits differ in the
# last bits: at most 3e-6 on fp32 logits of scale 5, torch and onnxruntime on CPU (measured by
# benchmarks/spec_decode.py). Where the top-2 allowed logits of a position lie closer than this
# tolerance (30x that), a drafted forward may pick the other one: a near-tie of the engine, not an
# error of the acceptance logic. Reduced-precision engines (fp16, int8) differ more and need their own.
NEAR_TIE_TOLERANCE = 1e-4


def generate(backend: Backend, inputs: ModelInputs, eos_id: int, max_new_tokens: int,
             grammar_state=None, on_event: Callable[[Any], None] | None = None,
             preprocess_ms: float = 0.0, drafter: Drafter | None = None) -> GenerationResult:
    """Greedy generation of up to ``max_new_tokens`` ids after the prompt.

    Raises :class:`NonFiniteError` as soon as image features or logits hold NaN or inf.

    ``grammar_state`` (optional) follows the runtime grammar's protocol: ``allowed_mask()``,
    ``forced_span()``, ``advance(token) -> events`` and ``is_complete``. ``drafter`` (optional)
    proposes drafts to verify (speculative decoding; same ids, fewer sequential forwards).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    timings = {"preprocess": preprocess_ms}
    prompt = inputs.input_ids
    t0 = time.perf_counter()
    features = backend.vision(inputs.vision.crops, inputs.vision.pooled_patches_idx)
    _check_finite(features, "the image features")
    t1 = time.perf_counter()
    backend.reset(len(prompt) + max_new_tokens)
    logits = backend.forward(prompt, 0, image_features=features)[-1]
    _check_finite(logits, "the logits of the prompt")
    t2 = time.perf_counter()
    timings["vision"] = (t1 - t0) * 1e3
    timings["prefill"] = (t2 - t1) * 1e3

    out: list[int] = []
    events: list[Any] = []
    forwards = forced_total = 0
    stopped = "max_new_tokens"
    pos = len(prompt)
    cursor = drafter.cursor() if drafter is not None else None
    stats = drafter.stats if drafter is not None else DraftStats()

    def accept(token: int) -> None:
        out.append(token)
        if cursor is not None:
            cursor.advance(token)
        if grammar_state is not None:
            for ev in grammar_state.advance(token):
                events.append(ev)
                if on_event is not None:
                    on_event(ev)

    def finished() -> str | None:
        if out[-1] == eos_id:
            return "eos"
        if grammar_state is not None and grammar_state.is_complete:
            return "grammar_complete"
        return "max_new_tokens" if len(out) >= max_new_tokens else None

    def forced() -> list[int]:
        nonlocal forced_total
        span = [] if grammar_state is None else list(grammar_state.forced_span())[: max_new_tokens - len(out)]
        forced_total += len(span)
        for tok in span:
            accept(tok)
        return span

    def decided(first: list[int]) -> tuple[list[int], str | None]:
        """Accept ``first`` and, when drafting, the span the grammar forces after it (certain, so it
        rides in the next forward without a logits row). The plain loop keeps one forward per span."""
        for tok in first:
            accept(tok)
        end = finished()
        if end is None and drafter is not None:
            first = first + forced()
            end = finished()
        return first, end

    pending: list[int] = []  # decided tokens whose keys and values are not in the cache yet
    while True:
        if not pending:
            span = forced()
            if span:
                pending, end = span, finished()
            else:
                pending, end = decided([greedy_pick(logits, grammar_state)])
            if end is not None:
                stopped = end
                break
        draft = [] if drafter is None else _draft(drafter, grammar_state, out, cursor, max_new_tokens - len(out),
                                                  eos_id)
        if not draft:
            logits = backend.forward(np.asarray(pending, dtype=np.int64), pos)[-1]
            _check_finite(logits, f"the logits after {len(out)} new tokens")
            pos += len(pending)
            forwards += 1
            pending = []
            continue
        block = np.asarray(pending + draft, dtype=np.int64)
        rows = backend.forward(block, pos, logits_rows=np.arange(len(pending) - 1, len(block), dtype=np.int64))
        forwards += 1
        pos += len(pending)
        pending, end, kept = [], None, 0
        kinds = _kinds(cursor, draft)
        for kind in kinds:
            stats.drafted[kind] += 1
        for tok, kind, row in zip(draft, kinds, rows):
            _check_finite(row, f"the logits after {len(out)} new tokens")
            pick = greedy_pick(row, grammar_state)
            if pick != tok:
                pending, end = decided([pick])
                break
            accept(tok)
            stats.accepted[kind] += 1
            kept += 1
            pos += 1
            end = finished()
            if end is not None:
                break
        else:
            logits = rows[-1]
            _check_finite(logits, f"the logits after {len(out)} new tokens")
        drafter.update(len(draft), kept)
        if end is not None:
            stopped = end
            break
    t3 = time.perf_counter()
    timings["decode"] = (t3 - t2) * 1e3
    timings["total"] = preprocess_ms + (t3 - t0) * 1e3
    return GenerationResult(token_ids=out, prompt_tokens=len(prompt), timings_ms=timings, forwards=forwards,
                            forced_tokens=forced_total, stopped=stopped, events=events, drafts=stats)


def _kinds(cursor, draft: list[int]) -> list[str]:
    """The segment kind of each drafted token, as if all were accepted."""
    c, kinds = cursor.copy(), []
    for tok in draft:
        kinds.append(c.kind_of(tok))
        c.advance(tok)
    return kinds


def _draft(drafter: Drafter, state, out: list[int], cursor, room: int, eos_id: int) -> list[int]:
    """Up to ``drafter.k`` tokens to verify after ``out``: the sources' guess, cut at the first token
    the grammar forbids, each cut extended by the span the grammar forces from there (its rows are
    checked like any other, and accepted whenever the prefix before them is)."""
    n = min(drafter.k, room)
    sim = state.copy() if state is not None else None
    cur, ctx, draft = cursor.copy(), list(out), []

    def take(tok: int) -> bool:
        """Append one token; False once the answer would end with it."""
        draft.append(tok)
        ctx.append(tok)
        cur.advance(tok)
        return tok != eos_id and not (sim is not None and sim.is_complete)

    for _ in range(4):  # a cut guess may be picked up again after the forced span (alignment restarts)
        if len(draft) >= n:
            break
        guess, grew = drafter.propose(ctx, cur, n - len(draft)), False
        for tok in guess:
            if sim is not None:
                if not sim.is_allowed(tok):
                    break
                sim.advance(tok)
            grew = True
            if not take(tok):
                return draft
        if sim is not None and len(draft) < n and (grew or not draft):
            for tok in sim.forced_span()[: n - len(draft)]:
                sim.advance(tok)
                grew = True
                if not take(tok):
                    return draft
        if not grew:
            break
    return draft
