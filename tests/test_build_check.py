"""`molmoact-edge build --check-only`: the bundle's graphs against our table of TensorRT 10.3 ONNX
support, without TensorRT. Passes on the exported fixture bundle and its TensorRT quantised forms,
fails naming the node on graphs TensorRT cannot parse; `build` without TensorRT fails at once."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import needs_torch

onnx = pytest.importorskip("onnx", reason="build --check-only reads graphs with onnx: pip install 'molmoact-edge[tensorrt]'")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from molmoact_edge.runtime.engine.bundle import sha256_file  # noqa: E402
from molmoact_edge.export.trt_check import check_graph  # noqa: E402


def build(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "molmoact_edge", "build", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_fixture_bundle_passes(bundle_a):
    out = build("--bundle", bundle_a, "--check-only")
    assert out.returncode == 0, out.stderr
    assert "every graph passes the TensorRT 10.3 check" in out.stdout
    assert "vision.onnx" in out.stdout and "llm.onnx" in out.stdout


# --- quantised forms that target TensorRT (quantize --target tensorrt) -------------------------------------

@pytest.fixture(scope="module")
def quantised(checkpoint_a, tmp_path_factory):
    pytest.importorskip("torch", reason="quantising needs the torch side: pip install '.[export]'")
    from molmoact_edge.export.onnx_export import export_bundle
    from molmoact_edge.quantization.quantize import quantize_bundle
    from molmoact_edge.quantization.recipes import recipe_for

    root = tmp_path_factory.mktemp("trt_forms")
    base = export_bundle(checkpoint_a, root / "fp32", progress=lambda s: None)
    made = {}

    def make(scheme: str, target: str = "tensorrt"):
        if (scheme, target) not in made:
            r = recipe_for(scheme, target)
            if r.uses_calibration:  # 3 samples keep CI short; the check reads the graph form, not the values
                r = dataclasses.replace(r, max_samples=3)
            made[scheme, target] = quantize_bundle(checkpoint_a, root / f"{scheme}-{target}", r, base_bundle=base,
                                                   progress=lambda s: None)
        return made[scheme, target]

    return make


TRT_FORMS = ("fp16", "fp8", "int8-wo", "int4-rtn", "w8a8-sq", "int4-awq")


@needs_torch
@pytest.mark.parametrize("scheme", TRT_FORMS)
def test_tensorrt_quantised_forms_pass(quantised, scheme):
    out = build("--bundle", quantised(scheme), "--check-only")
    assert out.returncode == 0, out.stderr


def _weight_dq_scales(bundle) -> dict[str, np.ndarray]:
    """Every DequantizeLinear fed by a constant weight (not an activation's QuantizeLinear): node -> scale."""
    model = onnx.load(str(bundle / "llm.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    return {n.name: numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits}


@needs_torch
@pytest.mark.parametrize("scheme", ["int8-wo", "int4-rtn", "w8a8-sq", "int4-awq", "fp8"])
def test_every_weight_scale_of_a_tensorrt_form_is_positive(quantised, scheme):
    """TensorRT refuses a Q/DQ scale <= 0 (issue 12): the tensorrt target's weight rule is absmax-based."""
    scales = _weight_dq_scales(quantised(scheme))
    assert len(scales) == (9 if scheme in ("int8-wo", "int4-rtn", "int4-awq") else 8)  # 8 layer linears (+ lm_head)
    bad = {k: float(v.min()) for k, v in scales.items() if not (v > 0).all()}
    assert bad == {}


@needs_torch
def test_a_negative_weight_scale_is_still_refused(quantised, tmp_path):
    """The checker, not the quantiser, is what guards this: flip one channel's scale in a passing
    int8-wo tensorrt form and the node is named."""
    model = onnx.load(str(quantised("int8-wo") / "llm.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    scale = numpy_helper.to_array(inits[dq.input[1]]).copy()
    scale[0] = -scale[0]
    inits[dq.input[1]].CopyFrom(numpy_helper.from_array(scale, dq.input[1]))
    onnx.save(model, str(tmp_path / "llm.onnx"))
    bad = [f for f in check_graph(tmp_path / "llm.onnx", "llm")[0] if f.fatal]
    assert [f.node for f in bad] == [dq.name] and "positive" in bad[0].why


@needs_torch
def test_onnxruntime_form_fails_naming_each_matmulnbits(quantised):
    out = build("--bundle", quantised("int4-rtn", "onnxruntime"), "--check-only")
    assert out.returncode == 1
    named = [x for x in out.stderr.splitlines() if "com.microsoft::MatMulNBits" in x]
    assert len(named) == 9 and all("linear/" in x and "no importer" in x for x in named)
    assert "quantize --target tensorrt" in named[0]


# --- graphs TensorRT cannot take: hand-made, each with one problem -----------------------------------------

def _save(tmp_path, nodes, inputs, outputs, inits=(), opset=18, name="g.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _fatal(path, graph="vision"):
    return [f for f in check_graph(path, graph)[0] if f.fatal]


def _x(name="x", dtype=TensorProto.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def test_unsupported_and_unknown_ops_are_named(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="fine"),
             helper.make_node("Unique", ["a"], ["b"], name="uniq"),
             helper.make_node("Attention", ["b", "b", "b"], ["y"], name="attn23")]
    bad = _fatal(_save(tmp_path, nodes, [_x()], [_x("y")]))
    assert [(f.node, f.op) for f in bad] == [("uniq", "Unique"), ("attn23", "Attention")]
    assert "not supported by TensorRT 10.3" in bad[0].why and "not in molmoact-edge's table" in bad[1].why


def test_types_attributes_and_constant_inputs(tmp_path):
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")
    nodes = [helper.make_node("Add", ["i8", "i8"], ["s"], name="int8_add"),  # INT8 only through Q/DQ
             helper.make_node("Cast", ["x"], ["d"], name="to_double", to=TensorProto.DOUBLE),
             helper.make_node("Shape", ["x"], ["shp"], name="shape"),
             helper.make_node("Unsqueeze", ["x", "shp"], ["u1"], name="computed_axes"),
             helper.make_node("Unsqueeze", ["x", "axes"], ["u2"], name="constant_axes"),
             helper.make_node("TopK", ["x", "k"], ["v", "ix"], name="unsorted", sorted=0)]
    k = numpy_helper.from_array(np.array([1], dtype=np.int64), "k")
    path = _save(tmp_path, nodes, [_x(), _x("i8", TensorProto.INT8)],
                 [_x("s", TensorProto.INT8), _x("d", TensorProto.DOUBLE), _x("u1", shape=()), _x("u2", shape=()),
                  _x("v", shape=()), _x("ix", TensorProto.INT64, ())], [axes, k])
    bad = {f.node: f.why for f in _fatal(path)}
    assert set(bad) == {"int8_add", "to_double", "computed_axes", "unsorted"}
    assert "INT8" in bad["int8_add"] and "DOUBLE" in bad["to_double"] and "`axes` must be a constant" in bad["computed_axes"]


def test_qdq_rules(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 8), dtype=np.int8), "w")
    good = numpy_helper.from_array(np.full((4,), 0.5, np.float32), "good")
    signed = numpy_helper.from_array(np.array([0.5, -0.5, 0.5, 0.5], np.float32), "signed")
    zp = numpy_helper.from_array(np.array([0, 1, 0, 0], np.int8), "zp")
    blocks = numpy_helper.from_array(np.full((4, 2), 0.5, np.float32), "blocks")
    twoway = numpy_helper.from_array(np.full((2, 2), 0.5, np.float32), "twoway")
    nodes = [helper.make_node("DequantizeLinear", ["w", "good"], ["a"], name="ok_channel", axis=0),
             helper.make_node("DequantizeLinear", ["w", "blocks"], ["b"], name="ok_blocked", axis=1, block_size=4),
             helper.make_node("DequantizeLinear", ["w", "signed"], ["c"], name="negative_scale", axis=0),
             helper.make_node("DequantizeLinear", ["w", "good", "zp"], ["d"], name="zero_point", axis=0),
             helper.make_node("DequantizeLinear", ["w", "twoway"], ["e"], name="two_blocked_axes", axis=1, block_size=4)]
    outs = [_x(n, shape=(4, 8)) for n in "abcde"]
    path = _save(tmp_path, nodes, [], outs, [w, good, signed, zp, blocks, twoway], opset=21)
    findings = check_graph(path, "llm_static")[0]
    bad = {f.node: f.why for f in findings if f.fatal}
    assert set(bad) == {"negative_scale", "zero_point", "two_blocked_axes"}
    assert "positive" in bad["negative_scale"] and "zeros" in bad["zero_point"] and "one axis" in bad["two_blocked_axes"]
    assert any(not f.fatal and "opset 21" in f.why for f in findings)  # past the documented range: a note only


def test_only_profiled_dimensions_may_be_dynamic(tmp_path):
    nodes = [helper.make_node("Relu", ["crops"], ["y"], name="r")]
    ok = _save(tmp_path, nodes, [_x("crops", shape=("crops", 3))], [_x("y", shape=("crops", 3))], name="ok.onnx")
    assert _fatal(ok) == []
    bad = _save(tmp_path, nodes, [_x("crops", shape=("batch", 3))], [_x("y", shape=("batch", 3))], name="bad.onnx")
    (f,) = _fatal(bad)
    assert "'crops' dimension 0 ('batch') is dynamic" in f.why and "profile" in f.why


def test_cli_names_the_node_in_a_bundle(bundle_a, tmp_path):
    """The whole command on a bundle whose vision graph holds one unsupported node (hashes redone, so
    that the loader accepts it and the check is what refuses)."""
    b = tmp_path / "b"
    shutil.copytree(bundle_a, b)
    model = onnx.load(str(b / "vision.onnx"))
    victim = next(n for n in model.graph.node if n.op_type == "Softmax")
    victim.op_type = "Hardmax"  # parsed by TensorRT: still fine
    victim2 = next(n for n in model.graph.node if n.op_type == "Tanh")
    victim2.op_type, victim2.domain = "FastGelu", "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(b / "vision.onnx"))
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["vision.onnx"] = sha256_file(b / "vision.onnx")
    (b / "manifest.json").write_text(json.dumps(m, indent=2))
    out = build("--bundle", b, "--check-only")
    assert out.returncode == 1, out.stdout
    assert f"node '{victim2.name}' (com.microsoft::FastGelu)" in out.stderr
    assert victim.name not in out.stderr
    assert "vision.onnx" in out.stdout and "1 problem(s)" in out.stdout


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_without_tensorrt_fails_at_once_naming_the_extra(tmp_path):
    out = build("--bundle", tmp_path / "no-such-bundle", timeout=60)  # not even read: the import fails first
    assert out.returncode == 1
    assert "molmoact-edge[tensorrt]" in out.stderr and "no-such-bundle" not in out.stderr
