"""Grammar-constrained generation on the real tiny checkpoints: random weights never write a
parseable answer on their own (see the fixture's generated texts), with the grammar they always do."""

import json
import subprocess
import sys

import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="the torch reference: pip install '.[export]' (absent on a robot install)")
from conftest import GoldenCase, case_id, golden_cases

from molmoact_edge.export.checkpoint import load_model
from molmoact_edge.export.onnx_export import export_bundle
from molmoact_edge.export.torch_backend import TorchBackend
from molmoact_edge.runtime.engine.actions import ActionDecoder
from molmoact_edge.runtime.engine.pipeline import open_bundle
from molmoact_edge.runtime.engine.events import ActionComplete, DepthComplete, Finished, TraceComplete
from molmoact_edge.runtime.engine.grammar import OutputGrammar
from molmoact_edge.runtime.engine.parser import parse_step
from molmoact_edge.runtime.engine.pipeline import ModelSpec, Pipeline

CASES = golden_cases()


@pytest.fixture(scope="module")
def engines():
    cache = {}

    def get(fixture):
        if fixture not in cache:
            spec = ModelSpec.load(fixture / "checkpoint")
            pipe = Pipeline(spec, TorchBackend(load_model(fixture / "checkpoint", torch.float32)))
            cache[fixture] = (spec, pipe, OutputGrammar.from_config(spec.config, spec.tokenizer, max_actions=8))
        return cache[fixture]

    return get


def _run(pipe, grammar, case, instruction=None, steer=None):
    events = []
    out = pipe.step(case.images(), instruction or case.instruction, case.template, max_new_tokens=600,
                    grammar=grammar, steer_trace=steer, on_event=lambda t, ev: events.append(ev))
    return out, events


@pytest.mark.parametrize("item", CASES, ids=[case_id(c) for c in CASES])
@pytest.mark.parametrize("instruction", [None, "wipe the table with the sponge"])
def test_constrained_answer_always_parses(engines, item, instruction):
    fixture, name = item
    spec, pipe, grammar = engines(fixture)
    case = GoldenCase(fixture, name)
    out, events = _run(pipe, grammar, case, instruction)
    parsed = parse_step(out.text, ActionDecoder.from_checkpoint(spec.config, spec.tokenizer))
    assert parsed.parse_errors == [], out.text
    assert len(parsed.depth) == 100 and 1 <= len(parsed.trace) <= 5
    assert parsed.actions.shape[0] >= 1 and parsed.actions.shape[1] == 7
    # The streamed events say the same as the parsed text.
    kinds = [type(e) for e in events]
    assert kinds.index(DepthComplete) < kinds.index(TraceComplete) < kinds.index(ActionComplete)
    actions = [e for e in events if isinstance(e, ActionComplete)]
    np.testing.assert_array_equal(np.stack([a.values for a in actions]), parsed.actions)
    assert list(next(e for e in events if isinstance(e, DepthComplete)).codes) == parsed.depth
    assert out.result.stopped in ("eos", "grammar_complete")
    if out.result.stopped == "eos":
        assert isinstance(events[-1], Finished)
    assert out.result.forced_tokens > 0
    assert out.result.forwards < len(out.result.token_ids)  # forced spans share one forward


def test_steered_trace_is_used(engines, fixture_a):
    spec, pipe, grammar = engines(fixture_a)
    case = GoldenCase(fixture_a, "single_256")
    steer = [(12, 200), (60, 150), (101, 99)]
    out, events = _run(pipe, grammar, case, steer=steer)
    parsed = parse_step(out.text, ActionDecoder.from_checkpoint(spec.config, spec.tokenizer))
    assert parsed.trace == [list(p) for p in steer] and parsed.parse_errors == []
    trace_ev = next(e for e in events if isinstance(e, TraceComplete))
    assert trace_ev.steered and trace_ev.points == tuple(steer)


def test_onnxruntime_constrained_equals_reference(engines, fixture_a, tmp_path):
    spec, pipe, grammar = engines(fixture_a)
    case = GoldenCase(fixture_a, "single_640x480")
    ref, _ = _run(pipe, grammar, case)
    bundle = export_bundle(fixture_a / "checkpoint", tmp_path / "b", progress=lambda s: None)
    with open_bundle(bundle) as ort_pipe:
        got, _ = _run(ort_pipe, grammar, case)
    assert got.result.token_ids == ref.result.token_ids
    assert got.result.forwards == ref.result.forwards


def test_cli_json_has_parsed_fields_and_refuses_steering_without_grammar(fixture_a):
    case = GoldenCase(fixture_a, "single_256")
    base = [sys.executable, "-m", "molmoact_edge", "generate", "--checkpoint", str(fixture_a / "checkpoint"),
            "--image", str(case.image_paths[0]), "--instruction", case.instruction, "--json"]
    proc = subprocess.run(base + ["--max-new-tokens", "600", "--unnorm-key", "fractal20220817_data"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert len(d["depth"]) == 100 and d["parse_errors"] == [] and len(d["actions"][0]) == 7
    assert [e["type"] for e in d["events"]][:3] == ["depth", "trace", "action"]
    bad = subprocess.run(base + ["--unnorm-key", "bridge_orig"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "bridge_orig" in bad.stderr and "fractal20220817_data" in bad.stderr
    steer = subprocess.run(base + ["--no-grammar", "--steer-trace", "[[1, 2]]"], capture_output=True, text=True,
                           timeout=300)
    assert steer.returncode == 2 and "grammar" in steer.stderr
