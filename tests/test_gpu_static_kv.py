"""The static-cache LLM graph (export --static-kv): shapes that do not change per token, the position
as an input, and onnxruntime CPU still giving the official implementation's ids through it."""

import json

import numpy as np
import pytest
from conftest import GoldenCase, case_id, fixture_dirs, golden_cases, needs_torch

from molmoact_edge.runtime.engine.bundle import BundleError, load_manifest
from molmoact_edge.runtime.engine.config import ModelConfig
from molmoact_edge.runtime.engine.manifest import GraphSpec
from molmoact_edge.runtime.engine.onnx_proto import read_graph_info
from molmoact_edge.runtime.engine.ort_backend import OrtBackend
from molmoact_edge.runtime.engine.pipeline import ModelSpec, Pipeline

pytestmark = needs_torch
CASES = golden_cases()
# The dimensions an engine profile fixes once (token count, logits rows, cache length): none grows per token.
PROFILE_DIMS = {"q", "rows", "max_seq_len"}


@pytest.fixture(scope="session")
def static_bundles(tmp_path_factory):
    from molmoact_edge.export.onnx_export import export_bundle

    root = tmp_path_factory.mktemp("static_bundles")
    return {d: export_bundle(d / "checkpoint", root / d.name, progress=lambda s: None, static_kv=True)
            for d in fixture_dirs()}


@pytest.fixture(scope="session")
def static_a(static_bundles, fixture_a):
    return static_bundles[fixture_a]


def _backend(bundle, kv_input):
    return OrtBackend(load_manifest(bundle), ModelConfig.load(bundle), kv_input=kv_input)


def test_static_graph_has_no_per_token_dimension(static_a):
    m = load_manifest(static_a).manifest
    spec = m.graphs["llm_static"]
    assert (spec.kv_input, m.graphs["llm"].kv_input) == ("full", "prefix")
    assert spec.serves_q == (1, m.model.max_position_embeddings)
    info = read_graph_info(static_a / spec.file)  # the graph file itself, not only its manifest entry
    shapes = {t.name: tuple(t.shape) for t in info.inputs}
    assert list(shapes) == ["inputs_embeds", "position_ids", "kv_cache", "logits_index"]
    assert shapes["kv_cache"] == ("max_seq_len", m.model.layers, 2, m.model.kv_heads, m.model.head_dim)
    assert shapes["position_ids"] == ("q",) and shapes["inputs_embeds"] == (1, "q", m.model.hidden_size)
    symbolic = {d for s in shapes.values() for d in s if isinstance(d, str)}
    assert symbolic <= PROFILE_DIMS, symbolic
    # the CPU graph, by contrast, takes a past whose length is the position
    past = {t.name: tuple(t.shape) for t in read_graph_info(static_a / m.graphs["llm"].file).inputs}["past_kv"]
    assert isinstance(past[0], str) and past[0] not in PROFILE_DIMS


class _Recorder:
    """Records the shapes the backend binds, passing every call through to onnxruntime."""

    def __init__(self, session, seen):
        self.session, self.seen = session, seen

    def io_binding(self):
        binding = self.session.io_binding()
        seen = {}
        self.seen.append(seen)

        class Binding:
            def __getattr__(self, name):
                return getattr(binding, name)

            def bind_cpu_input(self, name, arr):
                seen[name] = tuple(arr.shape)
                return binding.bind_cpu_input(name, arr)

            def bind_input(self, name, device, device_id, dtype, shape, ptr):
                seen[name] = tuple(shape)
                return binding.bind_input(name, device, device_id, dtype, shape, ptr)

        return Binding()

    def run_with_iobinding(self, b):
        return self.session.run_with_iobinding(b)


def test_decode_steps_bind_identical_shapes(static_a, fixture_a):
    """Every decode step feeds the graph the same shapes (what a captured CUDA graph needs); only the
    position_ids values move. The same steps through the CPU graph grow past_kv by one row each."""
    case = GoldenCase(fixture_a, "single_256")
    ids = case["input_ids"][0]
    shapes = {}
    for kv_input in ("full", "prefix"):
        be = _backend(static_a, kv_input)
        feats = be.vision(case["images"][0], case["pooled_patches_idx"][0])
        seen = []
        be.sessions["llm"] = _Recorder(be.sessions["llm"], seen)
        be.reset(len(ids) + 8)
        be.forward(ids, 0, feats)
        for step, tok in enumerate(case["generated_ids"][:5]):
            be.forward(np.array([tok]), len(ids) + step)
        shapes[kv_input] = seen[1:]
    assert len(shapes["full"]) == 5 and all(s == shapes["full"][0] for s in shapes["full"])
    assert [s["past_kv"][0] for s in shapes["prefix"]] == list(range(len(ids), len(ids) + 5))


@pytest.mark.parametrize("item", CASES, ids=[case_id(c) for c in CASES])
def test_static_graph_reproduces_official_ids(item, static_bundles):
    fixture, name = item
    case = GoldenCase(fixture, name)
    bundle = static_bundles[fixture]
    want = case["generated_ids"].tolist()
    with Pipeline(ModelSpec.load(bundle), _backend(bundle, "full")) as p:
        out = p.step(case.images(), case.instruction, case.template, max_new_tokens=len(want))
    assert out.inputs.input_ids.tolist() == case["input_ids"][0].tolist()
    assert out.result.token_ids == want


def test_static_graph_matches_cpu_graph_and_ignores_stale_rows(static_a, fixture_a):
    """Prefill (with extra rows), decode and a k-token verification give the CPU graph's logits and
    K/V, with every unfilled row of the cache holding large garbage (masked in the graph, so a reused
    buffer needs no clearing)."""
    case = GoldenCase(fixture_a, "multi_2x256")
    ids = case["input_ids"][0]
    S = len(ids)
    span = np.array([785, 7990, 2415, 315, 279], dtype=np.int64)
    rows = np.asarray(case["earlier_positions"].tolist() + [S - 1])
    runs = {}
    for kv_input in ("prefix", "full"):
        be = _backend(static_a, kv_input)
        feats = be.vision(case["images"][0], case["pooled_patches_idx"][0])
        be.reset(S + 16)
        be.kv[:] = np.random.default_rng(0).uniform(-1e3, 1e3, be.kv.shape).astype(be.kv.dtype)
        pre = be.forward(ids, 0, feats, rows)
        dec = be.forward(np.array([int(pre[-1].argmax())]), S)
        ver = be.forward(span, S + 1, logits_rows=np.arange(len(span)))
        runs[kv_input] = (pre, dec, ver, be.kv[:S + 1 + len(span)].copy())
    assert np.abs(runs["full"][0][-1] - case["logits_last"]).max() < 1e-4
    for a, b in zip(runs["prefix"], runs["full"]):
        assert np.abs(a - b).max() < 1e-4


def test_full_kv_needs_the_static_graph(bundle_a):
    with pytest.raises(BundleError, match="--static-kv"):
        _backend(bundle_a, "full")
    with pytest.raises(ValueError, match="kv_input"):
        _backend(bundle_a, "paged")


def test_graph_roles_round_trip_and_are_checked():
    d = {"file": "llm_static.onnx", "inputs": [], "outputs": [], "kv_input": "full", "serves_q": [1, 4096]}
    g = GraphSpec.from_json(json.loads(json.dumps(d)), "graphs.llm_static")
    assert (g.kv_input, g.serves_q) == ("full", (1, 4096)) and g.to_json() == d
    for bad, msg in (({"kv_input": "paged"}, "kv_input"), ({"serves_q": [8, 2]}, "min > max"),
                     ({"serves_q": [0, 2]}, "serves_q")):
        with pytest.raises(BundleError, match=msg):
            GraphSpec.from_json({**d, **bad}, "graphs.llm_static")
