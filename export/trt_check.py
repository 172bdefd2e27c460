"""Will TensorRT 10.3 (JetPack 6.1/6.2) parse this graph? A check without TensorRT or a GPU.

The facts are onnx-tensorrt's operator support matrix (docs/operators.md) of the 10.x parser, as
of release 10.1, moved forward by the parser changelog for 10.2 and 10.3 (10.3: ``Slice`` accepts
tensor ``axes``; nothing else that this table holds changed), and two readings of the 10.x parser
source where the matrix is silent: it sets no upper opset bound (the matrix documents 9..20; our
Q/DQ graphs are opset 21), and ``DequantizeLinear`` infers a block size from the scale's shape
(so an opset-21 ``block_size`` needs a scale of the input's rank, blocked along one axis), and
``Clip`` also takes INT32/INT64 (the importer's elementwise path; the matrix lists floats only).

Written as our own table, not read from TensorRT: an op missing here is reported as unknown, and
a TensorRT that does parse it means the table needs that op added. What the check covers: each
node's domain and op, the data types it computes in, the attributes and constant inputs the
matrix restricts, and the graph inputs' dynamic dimensions (only those an optimisation profile
sets may be dynamic). It does not prove the engine builds: tactic, memory and precision choices
happen in the builder (`molmoact-edge build` on the device).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from molmoact_edge.runtime.engine.trt_profiles import LLM_GRAPH, llm_profiles, vision_profiles

TRT_VERSION = "10.3"
OPSET_DOCUMENTED = (9, 20)

_F = frozenset({"FLOAT", "FLOAT16", "BFLOAT16"})
_FI = _F | {"INT32", "INT64"}
_FIB = _FI | {"BOOL"}
_B = frozenset({"BOOL"})
_FLOATS_ONLY = """Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Conv
    ConvTranspose Cos Cosh CumSum Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf LayerNormalization
    LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
    Reciprocal Resize RNN Round ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh
    ThresholdedRelu Upsample"""
_NUMERIC = """Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max
    Min Mod Mul Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
    ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub Sum
    TopK"""
_ANY = """Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop
    OneHot Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where"""
# op -> the data types it computes in (what the matrix's "Supported Types" column lists)
SUPPORTED: dict[str, frozenset[str]] = {
    **{op: _F for op in _FLOATS_ONLY.split()},
    **{op: _FI for op in _NUMERIC.split()},
    **{op: _FIB for op in _ANY.split()},
    **{op: _B for op in ("And", "Not", "Or", "Xor")},
    "Clip": _FI,  # the matrix says floats; the 10.x importer clips INT32/INT64 with elementwise max/min
    "Cast": _FIB | {"UINT8"}, "CastLike": _FIB | {"UINT8"},
    "DequantizeLinear": frozenset({"INT8", "INT4", "FLOAT8E4M3FN"}),
    "Gelu": _FI | {"INT8"}, "Mean": _FI | {"FLOAT8E4M3FN"},
    "DeformConv": frozenset({"FLOAT", "FLOAT16"}), "GridSample": frozenset({"FLOAT", "FLOAT16"}),
    "Mish": frozenset({"FLOAT", "FLOAT16"}), "NonMaxSuppression": frozenset({"FLOAT", "FLOAT16"}),
    "NonZero": frozenset({"FLOAT", "FLOAT16"}), "RoiAlign": frozenset({"FLOAT", "FLOAT16"}),
}
# ops the matrix lists as unsupported (the ones a transformer export or a quantiser can produce)
UNSUPPORTED = frozenset("""AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow
    Col2Im CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow
    HannWindow ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss
    Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch STFT SequenceAt
    SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss
    SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique""".split())
# Which inputs carry the data whose type the matrix means (others are indices, shapes, axes, scales).
DATA_INPUTS = {"Gather": (0,), "GatherElements": (0,), "GatherND": (0,), "Reshape": (0,), "Expand": (0,),
               "Slice": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Split": (0,), "Tile": (0,), "Pad": (0,),
               "Where": (1, 2), "DequantizeLinear": (0,), "QuantizeLinear": (0,), "TopK": (0,), "CumSum": (0,),
               "OneHot": (2,), "Resize": (0,), "ScatterND": (0,), "ScatterElements": (0,), "Scatter": (0,),
               "ConstantOfShape": (), "Range": (0, 1, 2), "Trilu": (0,), "Clip": (0,), "Shape": (0,), "Size": (0,),
               **{op: (0,) for op in _NUMERIC.split() if op.startswith("Reduce") or op.startswith("Arg")}}
# Inputs the parser needs as constants (initializers or Constant outputs), by op: (input index, name).
CONSTANT_INPUTS = {"Squeeze": (1, "axes"), "Unsqueeze": (1, "axes"), "Pad": (3, "axes"), "CumSum": (1, "axis"),
                   **{op: (1, "axes") for op in _NUMERIC.split() if op.startswith("Reduce")}}

# The dimensions the optimisation profiles set (runtime/engine/trt_profiles.py); any other dynamic input
# dimension cannot be built. ``llm`` (the CPU graph, growing past) is checked with its own dims.
PROFILED_DIMS = {"vision": set(vision_profiles()[0].dims), LLM_GRAPH: set(llm_profiles(16, 2)[0].dims),
                 "llm": {"q", "past", "rows"}}


@dataclass(frozen=True)
class Finding:
    graph: str
    node: str  # node name ("" for a graph-level finding)
    op: str
    why: str
    fatal: bool = True

    def line(self) -> str:
        where = f"{self.graph}: node {self.node!r} ({self.op})" if self.node or self.op else f"{self.graph}"
        return f"{where}: {self.why}" if self.fatal else f"note: {where}: {self.why}"


def _import_onnx():
    from molmoact_edge.runtime.engine.deps import import_backend

    return import_backend("onnx", "onnx", extra="tensorrt")


class _Graph:
    """A loaded graph's tensor types, constants and consumers (weights stay on disk)."""

    def __init__(self, onnx, model, base_dir: Path):
        self.onnx, self.model, self.base_dir = onnx, model, base_dir
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
        self.types: dict[str, str] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
            values = list(inferred.graph.value_info)
        except Exception:  # inference failing on an exotic graph only loses type facts, not the op check
            values = list(g.value_info)
        for v in list(g.input) + list(g.output) + values:
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                self.types[v.name] = onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)
        for t in g.initializer:
            self.types[t.name] = onnx.TensorProto.DataType.Name(t.data_type)
        for name, n in self.const_nodes.items():
            for a in n.attribute:
                if a.name == "value":
                    self.types[name] = onnx.TensorProto.DataType.Name(a.t.data_type)
        self.consumed = {i for n in g.node for i in n.input} | {o.name for o in g.output}

    def is_constant(self, name: str) -> bool:
        return name in self.inits or name in self.const_nodes

    def array(self, name: str):
        """A constant's values (an initializer's external data read for this tensor only)."""
        from onnx import numpy_helper
        from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

        if name in self.const_nodes:
            return numpy_helper.to_array(next(a.t for a in self.const_nodes[name].attribute if a.name == "value"))
        t = self.onnx.TensorProto()
        t.CopyFrom(self.inits[name])
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(self.base_dir))
        return numpy_helper.to_array(t)

    def dims(self, name: str) -> tuple | None:
        if name in self.inits:
            return tuple(self.inits[name].dims)
        if name in self.const_nodes:
            return tuple(next(a.t for a in self.const_nodes[name].attribute if a.name == "value").dims)
        return None


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _qdq_findings(g: _Graph, node, add) -> None:
    """The Q/DQ rules: zero point all zero, scale a positive constant, per-tensor, per-channel or
    blocked along exactly one axis."""
    zp = node.input[2] if len(node.input) > 2 else ""
    if zp:
        if not g.is_constant(zp):
            add("the zero point must be a constant (TensorRT quantises symmetrically)")
        elif g.array(zp).astype("float64").any():
            add("the zero point must be all zeros (TensorRT quantises symmetrically)")
    scale = node.input[1] if len(node.input) > 1 else ""
    if not scale:
        add("needs a scale input")
        return
    if not g.is_constant(scale):
        return  # a computed scale: allowed by the parser, its values are checked at build time
    if not (g.array(scale).astype("float64") > 0).all():
        add("scale coefficients must all be positive")
    sdims, xdims = g.dims(scale), g.dims(node.input[0])
    if sdims is None or len(sdims) <= 1 or xdims is None:
        return
    if len(sdims) != len(xdims):
        add(f"a scale of rank {len(sdims)} for an input of rank {len(xdims)}: TensorRT takes a scalar, one "
            "scale per channel (rank 1) or a blocked scale of the input's rank")
    elif sum(1 for a, b in zip(xdims, sdims) if b and a // b != 1) != 1 or any(b and a % b for a, b in zip(xdims, sdims)):
        add(f"scale {list(sdims)} for input {list(xdims)}: TensorRT blocks along exactly one axis, evenly")


def _node_findings(g: _Graph, graph: str, node, i: int) -> list[Finding]:
    out: list[Finding] = []
    name = node.name or f"#{i}"

    def add(why: str, fatal: bool = True):
        out.append(Finding(graph, name, node.op_type if not node.domain else f"{node.domain}::{node.op_type}",
                           why, fatal))

    if node.domain not in ("", "ai.onnx"):
        add(f"custom domain {node.domain!r}: TensorRT's ONNX parser has no importer for it (it would need a "
            "TensorRT plugin); use the TensorRT form of the bundle (quantize --target tensorrt)")
        return out
    op = node.op_type
    if op in UNSUPPORTED:
        add(f"{op} is not supported by TensorRT {TRT_VERSION}'s ONNX parser (onnx-tensorrt operators.md)")
        return out
    if op not in SUPPORTED:
        add(f"{op} is not in molmoact-edge's table of TensorRT {TRT_VERSION} ONNX support "
            "(export/trt_check.py); if TensorRT does parse it, add it there")
        return out
    allowed = SUPPORTED[op]
    positions = DATA_INPUTS.get(op, range(len(node.input)))
    for p in positions:
        if p < len(node.input) and node.input[p]:
            t = g.types.get(node.input[p])
            if t is not None and t not in allowed:
                add(f"input {node.input[p]!r} is {t}; TensorRT {TRT_VERSION} runs {op} on {sorted(allowed)}")
    a = _attrs(node)
    if op == "Cast":
        from onnx import TensorProto

        to = TensorProto.DataType.Name(a.get("to", 0))
        if to not in allowed:
            add(f"casts to {to}; TensorRT casts only between {sorted(allowed)}")
    elif op in ("DequantizeLinear", "QuantizeLinear"):
        _qdq_findings(g, node, add)
    elif op == "Constant":
        bad = sorted(set(a) & {"sparse_value", "value_string", "value_strings"})
        if bad:
            add(f"attribute {bad[0]} is not supported (only dense numeric values)")
    elif op == "LayerNormalization":
        if any(o and o in g.consumed for o in node.output[1:]):
            add("only the first output (Y) is supported; Mean / InvStdDev are used by the graph")
    elif op == "TopK" and a.get("sorted", 1) != 1:
        add("sorted must be 1")
    elif op == "ScatterND" and a.get("reduction", b"none") not in (b"none", "none"):
        add(f"reduction {a['reduction']!r} is not supported")
    if op in CONSTANT_INPUTS:
        idx, what = CONSTANT_INPUTS[op]
        if idx < len(node.input) and node.input[idx] and not g.is_constant(node.input[idx]):
            add(f"`{what}` must be a constant (an initializer), not the computed {node.input[idx]!r}")
    return out


def check_graph(path: Path, graph: str) -> tuple[list[Finding], dict]:
    """Findings for one graph file, and a summary (nodes, ops, opset)."""
    onnx = _import_onnx()
    model = onnx.load(str(path), load_external_data=False)
    g = _Graph(onnx, model, path.parent)
    findings: list[Finding] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    lo, hi = OPSET_DOCUMENTED
    if opset is None or opset < lo:
        findings.append(Finding(graph, "", "", f"opset {opset}: TensorRT {TRT_VERSION} parses opset {lo} and later"))
    elif opset > hi:
        findings.append(Finding(graph, "", "", f"opset {opset} is past the documented {lo}..{hi}; the 10.x parser sets no "
                                               "upper bound and every op here is checked on its own", fatal=False))
    for i, node in enumerate(model.graph.node):
        findings += _node_findings(g, graph, node, i)
    for fn in model.functions:  # local functions: their tensors have no inferred types, the rest is checked
        for i, node in enumerate(fn.node):
            findings += _node_findings(g, f"{graph}/{fn.name}", node, i)
    profiled = PROFILED_DIMS.get(graph)
    for v in model.graph.input:
        if v.name in g.inits:
            continue
        for k, d in enumerate(v.type.tensor_type.shape.dim):
            if d.dim_param and profiled is not None and d.dim_param not in profiled:
                findings.append(Finding(graph, "", "", f"input {v.name!r} dimension {k} ({d.dim_param!r}) is dynamic "
                                                       f"but no optimisation profile sets it (profiled: {sorted(profiled)})"))
            elif not d.dim_param and d.dim_value <= 0:
                findings.append(Finding(graph, "", "", f"input {v.name!r} dimension {k} has neither a size nor a name; "
                                                       "TensorRT profiles need named dynamic dimensions"))
    ops = sorted({n.op_type for n in model.graph.node})
    return findings, {"nodes": len(model.graph.node), "ops": ops, "opset": opset}
