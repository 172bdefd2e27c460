"""What one MolmoAct step returns: the generated answer, read, with its serialisers.

:meth:`Pipeline.act <molmoact_edge.runtime.engine.pipeline.Pipeline.act>` is the one call that
runs a step (preprocess -> decode loop under the grammar -> parse) and returns a
:class:`StepResult`. The CLI, the demo and the robot policy all use it, so they cannot drift
apart in how an answer is read or reported.

:class:`ActionReading` is how a checkpoint's actions are read for one ``norm_stats`` key: the
decoder (ids -> bins -> values) and the action dimension. ids, text, depth and trace need no key,
and neither does the grammar (it needs the action vocabulary, the bins and the action dimension);
only de-normalised values do. A checkpoint with several keys and none chosen is still read, with
the values reported as unavailable and the reason naming the keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from molmoact_edge.runtime.engine.actions import ActionDecoder
from molmoact_edge.runtime.engine.config import ConfigError, ModelConfig
from molmoact_edge.runtime.engine.events import (
    ActionComplete,
    DepthComplete,
    Event,
    Finished,
    TraceComplete,
)
from molmoact_edge.runtime.engine.generate import GenerationResult
from molmoact_edge.runtime.engine.parser import ParsedStep, extract_action_lists
from molmoact_edge.runtime.engine.prompt import ModelInputs


@dataclass(frozen=True)
class ActionReading:
    """How actions are read for one unnorm key. ``unavailable`` (None when values can be given)
    says why de-normalised values cannot be: then ``decoder`` has no statistics and its values
    stay normalised."""

    decoder: ActionDecoder
    action_dim: int
    unnorm_key: str | None
    unavailable: str | None = None

    @classmethod
    def resolve(cls, config: ModelConfig, tokenizer, unnorm_key: str | None) -> ActionReading:
        """An unknown key is an error (ConfigError listing the keys); no key with several is not."""
        stats = config.norm_stats
        if unnorm_key is not None or len(stats) == 1:
            key = config.resolve_unnorm_key(unnorm_key)
            decoder = ActionDecoder.from_checkpoint(config, tokenizer, key)
            return cls(decoder, decoder.stats.action_dim, key)
        if not stats:
            raise ConfigError("this checkpoint has no norm_stats: neither the action dimension nor de-normalised "
                              "actions are known")
        dims = {k: s.action_dim for k, s in sorted(stats.items())}
        if len(set(dims.values())) != 1:
            raise ConfigError(f"this checkpoint's norm_stats have different action dimensions {dims}; choose one "
                              "with --unnorm-key")
        decoder = ActionDecoder.from_checkpoint(config, tokenizer, denormalize=False)
        why = (f"de-normalised actions need a norm_stats key and this checkpoint has several: {sorted(stats)}; "
               "choose one with --unnorm-key")
        return cls(decoder, next(iter(dims.values())), None, why)


@dataclass(frozen=True)
class TimedEvent:
    """A grammar event and when it happened, in ms since the step started."""

    t_ms: float
    event: Event

    def to_dict(self) -> dict[str, Any]:
        ev, d = self.event, {"t_ms": round(self.t_ms, 3)}
        if isinstance(ev, DepthComplete):
            d.update(type="depth", codes=list(ev.codes))
        elif isinstance(ev, TraceComplete):
            d.update(type="trace", points=[list(p) for p in ev.points], steered=ev.steered)
        elif isinstance(ev, ActionComplete):
            # values: de-normalised (None without an unnorm key); normalized: the bin centres in [-1, 1]
            d.update(type="action", index=ev.index,
                     values=None if ev.values is None else [float(v) for v in ev.values],
                     normalized=[float(v) for v in ev.normalized])
        elif isinstance(ev, Finished):
            d.update(type="finished", n_actions=ev.n_actions)
        return d


@dataclass(frozen=True)
class StepResult:
    """One step: the prompt as run, the generation, its text and the answer read the official way.

    ``actions`` are de-normalised ([n, action_dim], n = 0 when the answer held none or when
    ``actions_error`` says why values cannot be given); ``parse_errors`` lists what was malformed
    in the answer itself."""

    inputs: ModelInputs
    generation: GenerationResult
    text: str
    parsed: ParsedStep
    reading: ActionReading
    events: tuple[TimedEvent, ...] = ()
    grammar: bool = True

    # -- the answer ---------------------------------------------------------------------------
    @property
    def token_ids(self) -> list[int]:
        return self.generation.token_ids

    @property
    def depth(self) -> list[int] | None:
        return self.parsed.depth

    @property
    def trace(self) -> list[list[int]] | None:
        return self.parsed.trace

    @property
    def actions(self) -> np.ndarray:
        if self.actions_error is not None:
            return np.zeros((0, self.reading.action_dim), dtype=np.float64)
        return self.parsed.actions

    @property
    def normalized_actions(self) -> np.ndarray:
        """The action lists as bin centres in [-1, 1]: what the model said, before any statistics."""
        dec = self.reading.decoder
        lists = extract_action_lists(self.text, action_dim=self.reading.action_dim)
        if not lists:
            return np.zeros((0, self.reading.action_dim), dtype=np.float64)
        return np.stack([dec.normalized_from_bins(dec.bins_from_ids(dec.ids_from_strings(s))) for s in lists])

    @property
    def parse_errors(self) -> list[str]:
        return self.parsed.parse_errors

    @property
    def actions_error(self) -> str | None:
        return self.reading.unavailable

    @property
    def unnorm_key(self) -> str | None:
        return self.reading.unnorm_key

    # -- how it ran ---------------------------------------------------------------------------
    @property
    def timings_ms(self) -> dict[str, float]:
        return self.generation.timings_ms

    @property
    def forwards(self) -> int:
        return self.generation.forwards

    @property
    def forced_tokens(self) -> int:
        return self.generation.forced_tokens

    @property
    def stopped(self) -> str:
        return self.generation.stopped

    # -- serialisers --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        r = self.generation
        return {
            "token_ids": r.token_ids,
            "text": self.text,
            "prompt_tokens": r.prompt_tokens,
            "new_tokens": len(r.token_ids),
            "stopped": r.stopped,
            "template": self.inputs.template,
            "llm_forwards": r.forwards,
            "forced_tokens": r.forced_tokens,
            "draft_tokens": r.drafts.draft_tokens,
            "accepted_tokens": r.drafts.accepted_tokens,
            "draft_segments": r.drafts.to_dict(),
            "timings_ms": {k: round(v, 3) for k, v in r.timings_ms.items()},
            "tokens_per_s": round(r.tokens_per_s, 2),
            "depth": self.depth,
            "trace": self.trace,
            "actions": [[float(v) for v in row] for row in self.actions],
            "actions_normalized": [[float(v) for v in row] for row in self.normalized_actions],
            "unnorm_key": self.unnorm_key,
            "actions_error": self.actions_error,
            "parse_errors": list(self.parse_errors),
            "grammar": self.grammar,
            "events": [e.to_dict() for e in self.events],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)
