"""One MolmoAct step end to end over any backend: images + instruction -> the answer, read.

:meth:`Pipeline.act` is the step every caller uses (CLI, demo, robot policy): it returns a
:class:`~molmoact_edge.runtime.engine.step.StepResult`. :meth:`Pipeline.step` is the layer below
(ids and text only, with a caller-made grammar).

A checkpoint directory and a bundle directory both carry the same JSON contracts
(``config.json``, ``preprocessor_config.json``, ``processor_config.json``, ``tokenizer.json``), so
one loader serves the torch reference and the deployed engines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from molmoact_edge.runtime.engine.backend import Backend
from molmoact_edge.runtime.engine.bundle import BundleError, load_manifest
from molmoact_edge.runtime.engine.config import (
    ImageProcessorConfig,
    ModelConfig,
    ProcessorConfig,
)
from molmoact_edge.runtime.engine.drafts import Drafter, SegmentTable
from molmoact_edge.runtime.engine.generate import GenerationResult, generate
from molmoact_edge.runtime.engine.grammar import OutputGrammar
from molmoact_edge.runtime.engine.ort_backend import OrtBackend
from molmoact_edge.runtime.engine.parser import parse_step
from molmoact_edge.runtime.engine.prompt import ModelInputs, build_inputs
from molmoact_edge.runtime.engine.step import ActionReading, StepResult, TimedEvent
from molmoact_edge.runtime.engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a model except its weights."""

    config: ModelConfig
    image: ImageProcessorConfig
    processor: ProcessorConfig
    tokenizer: Tokenizer

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelSpec:
        d = Path(model_dir)
        return cls(ModelConfig.load(d), ImageProcessorConfig.load(d), ProcessorConfig.load(d),
                   Tokenizer.from_checkpoint(d))

    def inputs(self, images, instruction: str, template: str | None = None) -> ModelInputs:
        return build_inputs(images, instruction, self.tokenizer, self.image, self.processor, template,
                            max_positions=self.config.llm.max_position_embeddings)


@dataclass
class StepOutput:
    inputs: ModelInputs
    result: GenerationResult
    text: str


class Pipeline:
    """Preprocess, run the backend's decode loop, decode the text."""

    def __init__(self, spec: ModelSpec, backend: Backend):
        self.spec, self.backend = spec, backend
        # built once per unnorm key (and answer shape) and shared by every step
        self._readings: dict[str | None, ActionReading] = {}
        self._grammars: dict[tuple[str | None, int], OutputGrammar] = {}
        self._segments: SegmentTable | None = None

    def reading(self, unnorm_key: str | None = None) -> ActionReading:
        """How actions are read for ``unnorm_key`` (None: the only key, or none chosen)."""
        if unnorm_key not in self._readings:
            r = ActionReading.resolve(self.spec.config, self.spec.tokenizer, unnorm_key)
            self._readings[unnorm_key] = self._readings.setdefault(r.unnorm_key, r)
        return self._readings[unnorm_key]

    def grammar(self, unnorm_key: str | None = None, max_actions: int = 1) -> OutputGrammar:
        """The output grammar for up to ``max_actions`` action lists, sharing the key's decoder."""
        r = self.reading(unnorm_key)
        key = (r.unnorm_key, max_actions)
        if key not in self._grammars:
            self._grammars[key] = OutputGrammar.from_tokenizer(
                self.spec.tokenizer, r.action_dim, n_action_bins=self.spec.config.n_action_bins,
                max_actions=max_actions, decoder=r.decoder, glue=self.spec.config.answer_glue)
        return self._grammars[key]

    def drafter(self, draft_from=None, ngram: bool = False, **options) -> Drafter | None:
        """A draft policy over ``draft_from`` (the token ids of an earlier answer) and, with
        ``ngram``, lookups within the answer itself; None when neither is asked for."""
        if not draft_from and not ngram:
            return None
        if self._segments is None:
            self._segments = SegmentTable.from_tokenizer(self.spec.tokenizer)
        return Drafter.from_previous(self._segments, draft_from, ngram=ngram, **options)

    def act(self, images, instruction: str, *, template: str | None = None, max_new_tokens: int = 256,
            grammar: bool = True, max_actions: int = 1, unnorm_key: str | None = None, steer_trace=None,
            on_event: Callable[[TimedEvent], None] | None = None, draft_from=None,
            draft_ngram: bool = False) -> StepResult:
        """One step, read: ids, text, depth, trace, actions and what was off, with timings.

        ``grammar`` constrains decoding to well-formed answers of up to ``max_actions`` action
        lists that fit ``max_new_tokens``; ``steer_trace`` forces the trace; ``on_event`` gets each
        part of the answer as it completes. Without an ``unnorm_key`` on a checkpoint with several,
        the step still runs and ``actions_error`` names the keys. Raises NonFiniteError when the
        model produces NaN or inf. ``draft_from`` (an earlier answer's token ids) drafts speculative
        decoding, ``draft_ngram`` adds lookups within the answer: the ids stay those of greedy decoding."""
        reading = self.reading(unnorm_key)
        g = self.grammar(unnorm_key, max_actions) if grammar else None
        events: list[TimedEvent] = []

        def record(t_ms: float, ev) -> None:
            events.append(TimedEvent(t_ms, ev))
            if on_event is not None:
                on_event(events[-1])

        out = self.step(images, instruction, template, max_new_tokens, grammar=g, steer_trace=steer_trace,
                        on_event=record, drafter=self.drafter(draft_from, draft_ngram))
        parsed = parse_step(out.text, reading.decoder, action_dim=reading.action_dim)
        return StepResult(out.inputs, out.result, out.text, parsed, reading, tuple(events), grammar=g is not None)

    def step(self, images, instruction: str, template: str | None = None, max_new_tokens: int = 256,
             grammar=None, steer_trace=None, on_event: Callable[[float, Any], None] | None = None,
             drafter: Drafter | None = None) -> StepOutput:
        """One step. With ``grammar`` (an :class:`~molmoact_edge.runtime.engine.grammar.OutputGrammar`) decoding
        is constrained to well-formed answers; ``steer_trace`` forces the trace slot (trajectory
        steering). ``on_event(ms_since_start, event)`` streams depth / trace / each action as they
        complete. ``drafter`` (see :meth:`drafter`) decodes speculatively."""
        if steer_trace is not None and grammar is None:
            raise ValueError("steering the trace needs the output grammar (do not combine with --no-grammar)")
        t0 = time.perf_counter()
        inputs = self.spec.inputs(images, instruction, template)
        pre_ms = (time.perf_counter() - t0) * 1e3
        state = grammar.start(trace=steer_trace, max_tokens=max_new_tokens) if grammar is not None else None
        timed = None if on_event is None else (lambda ev: on_event((time.perf_counter() - t0) * 1e3, ev))
        result = generate(self.backend, inputs, self.spec.tokenizer.special.eos, max_new_tokens,
                          grammar_state=state, on_event=timed, preprocess_ms=pre_ms, drafter=drafter)
        return StepOutput(inputs, result, self.spec.tokenizer.decode(result.token_ids))

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_bundle(bundle_dir: str | Path, backend: str = "onnxruntime", verify_hashes: bool = True,
                bundle_sha256: str | None = None, **options) -> Pipeline:
    """A ready :class:`Pipeline` over an exported bundle; ``bundle_sha256`` pins its manifest's hash."""
    manifest = load_manifest(bundle_dir, verify_hashes=verify_hashes, bundle_sha256=bundle_sha256)
    spec = ModelSpec.load(manifest.path)
    if backend == "onnxruntime":
        return Pipeline(spec, OrtBackend(manifest, spec.config, **options))
    if backend == "tensorrt":  # imported here: TensorRT and cuda-python load only when asked for
        from molmoact_edge.runtime.engine.trt_backend import TrtBackend

        return Pipeline(spec, TrtBackend(manifest, spec.config, **options))
    raise BundleError(f"unknown backend {backend!r}; the bundle runs on: onnxruntime, tensorrt")
