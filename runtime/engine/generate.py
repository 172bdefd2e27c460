"""The engine-agnostic generation loop: preprocessing -> vision -> prefill -> greedy decode.

With an output grammar, every step is masked to the tokens the grammar allows, and where the
grammar leaves exactly one continuation (glue text, ``<DEPTH_END>``, the tail of an action
string) the whole span is appended in ONE multi-token forward instead of one forward per token.
Without a grammar the loop is plain greedy decoding, identical to the official ``generate``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from molmoact_edge.runtime.engine.backend import Backend
from molmoact_edge.runtime.engine.constrain import greedy_pick
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

    @property
    def tokens_per_s(self) -> float:
        t = self.timings_ms.get("decode", 0.0)
        return len(self.token_ids) / (t / 1000.0) if t > 0 else float("nan")


def generate(backend: Backend, inputs: ModelInputs, eos_id: int, max_new_tokens: int,
             grammar_state=None, on_event: Callable[[Any], None] | None = None,
             preprocess_ms: float = 0.0) -> GenerationResult:
    """Greedy generation of up to ``max_new_tokens`` ids after the prompt.

    Raises :class:`NonFiniteError` as soon as image features or logits hold NaN or inf.

    ``grammar_state`` (optional) follows the runtime grammar's protocol: ``allowed_mask()``,
    ``forced_span()``, ``advance(token) -> events`` and ``is_complete``.
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

    def accept(token: int) -> None:
        out.append(token)
        if grammar_state is not None:
            for ev in grammar_state.advance(token):
                events.append(ev)
                if on_event is not None:
                    on_event(ev)

    while len(out) < max_new_tokens:
        span: list[int] = []
        if grammar_state is not None:
            span = list(grammar_state.forced_span())[: max_new_tokens - len(out)]
        if span:
            forced_total += len(span)
            new = span
        else:
            new = [greedy_pick(logits, grammar_state)]
        for tok in new:
            accept(tok)
        if out[-1] == eos_id:
            stopped = "eos"
            break
        if grammar_state is not None and grammar_state.is_complete:
            stopped = "grammar_complete"
            break
        if len(out) >= max_new_tokens:
            break
        logits = backend.forward(np.asarray(new, dtype=np.int64), pos)[-1]
        _check_finite(logits, f"the logits after {len(out)} new tokens")
        pos += len(new)
        forwards += 1
    t3 = time.perf_counter()
    timings["decode"] = (t3 - t2) * 1e3
    timings["total"] = preprocess_ms + (t3 - t0) * 1e3
    return GenerationResult(token_ids=out, prompt_tokens=len(prompt), timings_ms=timings, forwards=forwards,
                            forced_tokens=forced_total, stopped=stopped, events=events)
