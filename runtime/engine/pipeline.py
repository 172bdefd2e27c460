"""One MolmoAct step end to end over any backend: images + instruction -> generated ids and text.

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
from molmoact_edge.runtime.engine.generate import GenerationResult, generate
from molmoact_edge.runtime.engine.ort_backend import OrtBackend
from molmoact_edge.runtime.engine.prompt import ModelInputs, build_inputs
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
        return build_inputs(images, instruction, self.tokenizer, self.image, self.processor, template)


@dataclass
class StepOutput:
    inputs: ModelInputs
    result: GenerationResult
    text: str


class Pipeline:
    """Preprocess, run the backend's decode loop, decode the text."""

    def __init__(self, spec: ModelSpec, backend: Backend):
        self.spec, self.backend = spec, backend

    def step(self, images, instruction: str, template: str | None = None, max_new_tokens: int = 256,
             grammar=None, steer_trace=None, on_event: Callable[[float, Any], None] | None = None) -> StepOutput:
        """One step. With ``grammar`` (an :class:`~molmoact_edge.runtime.engine.grammar.OutputGrammar`) decoding
        is constrained to well-formed answers; ``steer_trace`` forces the trace slot (trajectory
        steering). ``on_event(ms_since_start, event)`` streams depth / trace / each action as they
        complete."""
        if steer_trace is not None and grammar is None:
            raise ValueError("steering the trace needs the output grammar (do not combine with --no-grammar)")
        t0 = time.perf_counter()
        inputs = self.spec.inputs(images, instruction, template)
        pre_ms = (time.perf_counter() - t0) * 1e3
        state = grammar.start(trace=steer_trace) if grammar is not None else None
        timed = None if on_event is None else (lambda ev: on_event((time.perf_counter() - t0) * 1e3, ev))
        result = generate(self.backend, inputs, self.spec.tokenizer.special.eos, max_new_tokens,
                          grammar_state=state, on_event=timed, preprocess_ms=pre_ms)
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
    raise BundleError(f"unknown backend {backend!r}; the bundle runs on: onnxruntime")
