"""The manifest schema (runtime/engine/manifest.py) and the torch-free ONNX protobuf reader the bundle
loader uses (runtime/engine/onnx_proto.py), checked against the ``onnx`` package's own reading."""

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from molmoact_edge.runtime.engine.manifest import (
    BundleError,
    EmbeddingsSpec,
    GraphSpec,
    KvCacheSpec,
    Manifest,
    ModelDims,
    TensorSpec,
    check_relpath,
)

SHA = "ab" * 32


def _manifest(**kw) -> Manifest:
    graphs = {"llm": GraphSpec("llm.onnx", (TensorSpec("inputs_embeds", "float32", (1, "q", 32)),),
                               (TensorSpec("logits", "float32", ("rows", 152064)),))}
    base = dict(dtype="fp32", opset=18,
                model=ModelDims(32, 2, 2, 8, 152064, 152192, 152066, 4096), graphs=graphs,
                kv_cache=KvCacheSpec("float32", ("positions", 2, 2, 2, 8)),
                embeddings=EmbeddingsSpec("embeddings.npy", "float32", (152192, 32)),
                files={"llm.onnx": SHA, "embeddings.npy": SHA}, tools={"molmoact_edge": "0.1.0"})
    base.update(kw)
    return Manifest(**base)


def test_round_trip():
    m = _manifest()
    assert Manifest.from_json(m.to_json()) == m
    assert "quantization" not in m.to_json() and "engines" not in m.to_json()


def test_quantization_and_engines_have_their_place():
    recipe = {"scheme": "int4", "granularity": "group", "group_size": 128, "kept_layers": ["lm_head"],
              "calibration_sha256": SHA, "bytes": {"llm": 123}}
    engine = {"file": "engines/llm.plan", "gpu": "Orin", "tensorrt": "10.3"}
    m = _manifest(quantization=recipe, engines=(engine,), files={"llm.onnx": SHA, "engines/llm.plan": SHA})
    back = Manifest.from_json(m.to_json())
    assert back == m and back.quantization == recipe
    assert "engines/llm.plan" in back.read_files()  # so the loader insists on its hash
    bad = m.to_json()
    bad["engines"][0]["file"] = "../elsewhere.plan"
    with pytest.raises(BundleError, match=r"engines\[0\].file = '../elsewhere.plan' leads out"):
        Manifest.from_json(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format_version=2), "bundle format version 2, but this molmoact-edge reads version 1"),
    (lambda d: d.update(speculative={"k": 4}), r"unknown field\(s\) \['speculative'\]"),
    (lambda d: d.update(dtype="int3"), "dtype 'int3' is not one of"),
    (lambda d: d["files"].update({"llm.onnx": "XYZ"}), "must be a lowercase sha256 hex digest"),
    (lambda d: d["files"].update({"manifest.json": SHA}), "files lists manifest.json itself"),
    (lambda d: d["model"].update(layers="2"), "model.layers must be an integer >= 1"),
    (lambda d: d["model"].pop("hidden_size"), "missing field 'model.hidden_size'"),
    (lambda d: d["kv_cache"].update(layout=["layers", "positions", "kv", "kv_heads", "head_dim"]), "kv_cache.layout"),
    (lambda d: d["graphs"]["llm"].update(file="/abs/llm.onnx"), "graphs.llm.file = '/abs/llm.onnx' is an absolute path"),
    (lambda d: d["embeddings"].update(shape=[152192]), r"embeddings.shape must be \[rows, hidden_size\]"),
])
def test_malformed_manifest_is_refused(edit, message):
    d = copy.deepcopy(_manifest().to_json())
    edit(d)
    with pytest.raises(BundleError, match=message):
        Manifest.from_json(d)


def _leaves(d, path=()):
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    out = [path] if path else []
    for k, v in items:
        out += _leaves(v, path + (k,))
    return out


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 200000) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_edited_field_gives_a_bundle_error_or_a_valid_manifest(data):
    """Whatever a hand edit puts anywhere in the manifest, reading it never ends in a TypeError or
    KeyError: it is refused with a BundleError that names the field, or it is a well-formed manifest."""
    d = _manifest(quantization={"scheme": "int8"}, engines=({"file": "e.plan"},)).to_json()
    path = data.draw(st.sampled_from(_leaves(d)))
    parent = d
    for k in path[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()):
        parent[path[-1]] = data.draw(JSON)
    elif isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])
    try:
        m = Manifest.from_json(d)
    except BundleError:
        return
    assert Manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize("rel", ["", "/etc/passwd", "../x", "a/../../x", "a/../b", "./a", "a//b", "a\\b", "C:x",
                                 "a/", "nul\0"])
def test_paths_outside_or_unnormalised_are_refused(rel):
    with pytest.raises(BundleError):
        check_relpath(rel, "f")


@pytest.mark.parametrize("rel", ["llm.onnx", "engines/llm.plan", "a.b/c.onnx.data"])
def test_paths_inside_are_accepted(rel):
    assert check_relpath(rel, "f") == rel


# ---- the protobuf reader against onnx's own reading ------------------------------------------


def _onnx_view(path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    m = onnx.load(str(path), load_external_data=False)
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in m.opset_import}

    def specs(values):
        return tuple((v.name, np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name,
                      tuple(d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim))
                     for v in values)

    return opsets, specs(m.graph.input), specs(m.graph.output)


def test_reader_agrees_with_onnx_and_finds_every_external_location(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    def external(name, location, values):
        t = numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", str(4 * len(values)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    then = helper.make_graph([helper.make_node("Constant", [], ["y"], value=external("c", "in_subgraph.bin", [1.0]))],
                             "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    other = helper.make_graph([helper.make_node("Identity", ["w"], ["z"])], "else", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    nodes = [helper.make_node("Constant", [], ["k"], value=external("k0", "constant.bin", [2.0])),
             helper.make_node("If", ["cond"], ["out"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 3, None])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        initializer=[external("w", "weights/w.bin", [3.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "g.onnx"
    path.write_bytes(model.SerializeToString())

    from molmoact_edge.runtime.engine.onnx_proto import read_graph_info

    info = read_graph_info(path)
    opsets, inputs, outputs = _onnx_view(path)
    assert info.opsets == opsets == {"": 18, "com.microsoft": 1}
    assert tuple((v.name, v.dtype, v.shape) for v in info.inputs) == inputs
    assert tuple((v.name, v.dtype, v.shape) for v in info.outputs) == outputs
    assert info.external_locations == {"weights/w.bin", "constant.bin", "in_subgraph.bin"}


def test_reader_refuses_what_is_not_a_model(tmp_path):
    from molmoact_edge.runtime.engine.onnx_proto import OnnxProtoError, read_graph_info

    for name, data in (("empty.onnx", b""), ("text.onnx", b"not a protobuf at all"), ("cut.onnx", b"\x3a\xff\xff")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(OnnxProtoError):
            read_graph_info(tmp_path / name)
