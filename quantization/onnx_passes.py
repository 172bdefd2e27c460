"""The ONNX side of the weight-only recipes (onnxruntime target form): MatMulNBits kernels.

1. :func:`name_linear_weights` finds each linear layer of the exported LLM graph (the exporter
   folds the transposed weights into anonymous initializers) by matching values against the
   reference model, names the node and its weight after the layer, and turns the lm_head ``Gemm``
   (transB) into a ``MatMul`` so that every linear layer has the same form.
2. INT4 blockwise: onnxruntime's own ``MatMulNBitsQuantizer`` (RTN, symmetric), one call per stored
   block size (a layer whose K is below the group uses one block over the whole of K, stored as the
   next power of two >= 16, as MatMulNBits requires).
3. INT8 per output channel: MatMulNBits with bits=8 whose per-block scales all repeat the channel's
   one scale. onnxruntime's quantiser cannot do this itself (``channel_wised_quantize`` is refused
   for the QOperator format, and one block over a whole 7B row would pad K=18944 to 32768), so the
   packing (codes + 128, [N, blocks, block]) is written here; a test holds it against the quantiser
   where both apply.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import numpy as np
import onnx
import torch
from molmoact_edge.export.model import MolmoAct
from molmoact_edge.quantization.fake_quant import llm_linears
from molmoact_edge.quantization.recipes import WeightOnlyRecipe
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
INT8_BLOCK = 128  # storage block of the per-channel INT8 layout; every block repeats the channel scale


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def name_linear_weights(model: onnx.ModelProto, reference: MolmoAct, gemm_to_matmul: bool = True) -> dict[str, str]:
    """Name every linear layer's node ``linear/<layer>`` and weight ``<layer>.weight_t`` ([in, out]).
    Returns node name -> layer. Raises if a layer is not found (the graph would silently stay float)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    dtype = helper.tensor_dtype_to_np_dtype(g.input[0].type.tensor_type.elem_type)
    want = {}
    for layer, lin in llm_linears(reference).items():
        w = lin.weight.detach().to(torch.float32).numpy().astype(dtype)
        want[_digest(w.T)] = layer
        want["T" + _digest(w)] = layer  # a Gemm with transB=1 holds [out, in] as is
    found: dict[str, str] = {}
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        arr = numpy_helper.to_array(inits[node.input[1]])
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if len(node.input) > 2 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                continue
            key = ("T" if attrs.get("transB", 0) else "") + _digest(arr)
        else:
            key = _digest(arr)
        layer = want.get(key)
        if layer is None:
            continue
        if layer in found.values():
            raise ValueError(f"two graph weights match layer {layer}; cannot tell the layers apart")
        new_name = f"{layer}.weight_t"
        if node.op_type == "Gemm":
            if not gemm_to_matmul:
                found[node.name or layer] = layer
                continue
            init = numpy_helper.from_array(np.ascontiguousarray(arr.T if "T" == key[0] else arr), new_name)
            g.initializer.remove(inits[node.input[1]])
            g.initializer.append(init)
            node.op_type = "MatMul"
            del node.attribute[:]
        else:
            inits[node.input[1]].name = new_name
        node.input[1] = new_name
        node.name = f"linear/{layer}"
        found[node.name] = layer
    missing = sorted(set(llm_linears(reference)) - set(found.values()))
    if missing:
        raise ValueError(f"linear layers {missing} were not found in the LLM graph; the export changed its form")
    return found


def _stored_block(k: int, group: int) -> int:
    if group >= k:  # one group over the whole of K
        return max(16, 1 << (k - 1).bit_length())
    return group


def _k_of(model: onnx.ModelProto, node_name: str) -> int:
    node = next(n for n in model.graph.node if n.name == node_name)
    init = next(t for t in model.graph.initializer if t.name == node.input[1])
    return int(init.dims[0])


def quantize_int4(model: onnx.ModelProto, nodes: Iterable[str], recipe: WeightOnlyRecipe) -> onnx.ModelProto:
    """RTN INT4 blockwise with onnxruntime's MatMulNBitsQuantizer (symmetric, fp32 compute)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    by_block: dict[int, list[str]] = {}
    for name in nodes:
        k = _k_of(model, name)
        by_block.setdefault(_stored_block(k, recipe.group_for(k)), []).append(name)
    log = logging.getLogger("onnxruntime.quantization")
    level = log.level
    log.setLevel(logging.WARNING)  # it logs one INFO line per node
    try:
        for block, names in sorted(by_block.items()):
            keep = {n.name for n in model.graph.node} - set(names)
            cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=None, bits=4)
            q = MatMulNBitsQuantizer(model, nodes_to_exclude=sorted(keep), algo_config=cfg)
            q.process()
            model = q.model.model
    finally:
        log.setLevel(level)
    return model


def pack_int8_per_channel(w_t: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """[K, N] float weight -> (uint8 codes [N, blocks, block], float32 scales [N, blocks], block),
    one scale per output channel under the recipes' rounding rule (recipes.py)."""
    k, n = w_t.shape
    w = np.ascontiguousarray(w_t.T, dtype=np.float32)  # [N, K]
    hi, lo = w.max(axis=1), w.min(axis=1)
    scale = (np.where(np.abs(hi) > np.abs(lo), hi, lo) / np.float32(-128)).astype(np.float32)
    nz = scale != 0
    inv = np.zeros_like(scale)
    inv[nz] = np.float32(1) / scale[nz]
    code = np.clip(np.floor(w * inv[:, None] + np.float32(128) + np.float32(0.5)), 0, 255).astype(np.uint8)
    block = _stored_block(k, INT8_BLOCK)
    blocks = -(-k // block)
    codes = np.full((n, blocks * block), 128, dtype=np.uint8)  # 128 = the code of 0 (padding)
    codes[:, :k] = code
    scales = np.repeat(scale[:, None], blocks, axis=1).astype(np.float32)
    return codes.reshape(n, blocks, block), scales, block


def quantize_int8_per_channel(model: onnx.ModelProto, nodes: Iterable[str]) -> onnx.ModelProto:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    names = set(nodes)
    for node in list(g.node):
        if node.name not in names:
            continue
        w_t = numpy_helper.to_array(inits[node.input[1]])
        k, n = w_t.shape
        codes, scales, block = pack_int8_per_channel(w_t)
        base = node.input[1]
        g.initializer.remove(inits[base])
        g.initializer.extend([numpy_helper.from_array(codes, f"{base}_Q8"), numpy_helper.from_array(scales, f"{base}_scales")])
        new = helper.make_node("MatMulNBits", [node.input[0], f"{base}_Q8", f"{base}_scales"], list(node.output),
                               name=node.name, domain=MS_DOMAIN, K=k, N=n, bits=8, block_size=block)
        idx = list(g.node).index(node)
        g.node.remove(node)
        g.node.insert(idx, new)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def quantize_llm_graph(model: onnx.ModelProto, layers: dict[str, str], recipe: WeightOnlyRecipe) -> onnx.ModelProto:
    """Apply the recipe to the named linear layers (node name -> layer) of a prepared LLM graph."""
    head = [n for n, layer in layers.items() if layer == "lm_head"]
    body = [n for n, layer in layers.items() if layer != "lm_head"]
    for names, r in ((body, recipe), (head, recipe.head_recipe())):
        if r.bits == 4:
            model = quantize_int4(model, names, r)
        else:
            model = quantize_int8_per_channel(model, names)
    return model


def quantize_fp8_qdq(model: onnx.ModelProto, layers: dict[str, str], act_amax: dict[str, float]) -> onnx.ModelProto:
    """Explicit Q/DQ FP8 (the form TensorRT builds FP8 engines from; onnxruntime CPU runs it as a
    simulation): input -> QuantizeLinear/DequantizeLinear (per-tensor, static) and the weight stored
    as float8 e4m3fn with a per-output-channel DequantizeLinear, into the unchanged MatMul."""
    import ml_dtypes

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    fp8_max = 448.0
    for node in list(g.node):
        layer = layers.get(node.name)
        if layer is None or layer == "lm_head":
            continue
        base = node.input[1]
        w_t = numpy_helper.to_array(inits[base]).astype(np.float32)  # [K, N]
        amax = np.abs(w_t).max(axis=0)
        w_scale = np.where(amax > 0, amax / np.float32(fp8_max), np.float32(1)).astype(np.float32)
        q = np.clip(w_t / w_scale[None, :], -fp8_max, fp8_max).astype(ml_dtypes.float8_e4m3fn)
        a_scale = np.array(np.float32(act_amax[layer]) / np.float32(fp8_max), dtype=np.float32)
        insert_static_qdq(g, node, layer, inits[base], "f8", q, w_scale, a_scale,
                          np.zeros((), dtype=ml_dtypes.float8_e4m3fn), saturate=1)
    _require_opset(model, 21)
    return model


def insert_static_qdq(g: onnx.GraphProto, node: onnx.NodeProto, layer: str, weight: onnx.TensorProto, tag: str,
                      codes: np.ndarray, w_scale: np.ndarray, a_scale: np.ndarray, zero: np.ndarray,
                      **quantize_attrs) -> None:
    """Rewire one MatMul to the explicit Q/DQ form TensorRT builds from: its input through a static
    per-tensor QuantizeLinear/DequantizeLinear, its float weight ``weight`` replaced by ``codes``
    with a per-output-channel DequantizeLinear. ``tag`` names the new tensors (f8, i8)."""
    base = weight.name
    g.initializer.remove(weight)
    g.initializer.extend([numpy_helper.from_array(codes, f"{base}_{tag}"),
                          numpy_helper.from_array(w_scale, f"{base}_{tag}_scale"),
                          numpy_helper.from_array(a_scale, f"{layer}.input_{tag}_scale"),
                          numpy_helper.from_array(zero, f"{layer}.input_{tag}_zero")])
    a_q = [f"{layer}.input_{tag}_scale", f"{layer}.input_{tag}_zero"]
    new = [
        helper.make_node("QuantizeLinear", [node.input[0], *a_q], [f"{layer}.input_q"],
                         name=f"{node.name}/quantize_input", **quantize_attrs),
        helper.make_node("DequantizeLinear", [f"{layer}.input_q", *a_q], [f"{layer}.input_dq"],
                         name=f"{node.name}/dequantize_input"),
        helper.make_node("DequantizeLinear", [f"{base}_{tag}", f"{base}_{tag}_scale"], [f"{base}_dq"],
                         name=f"{node.name}/dequantize_weight", axis=1),
    ]
    idx = list(g.node).index(node)
    for k, n in enumerate(new):
        g.node.insert(idx + k, n)
    node.input[0], node.input[1] = f"{layer}.input_dq", f"{base}_dq"


def _require_opset(model: onnx.ModelProto, version: int) -> None:
    """FP8 and INT4 Q/DQ need opset >= 19 / 21 and IR >= 10; the ops our graphs use keep their meaning."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < version:
            o.version = version
    model.ir_version = max(model.ir_version, 10)


def symmetric_codes(w_t: np.ndarray, bits: int, group: int, rule: str = "absmax") -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float weight -> (int8 codes [K, N], float32 scales [ceil(K/group), N]) under the
    recipes' weight rule ``rule`` (recipes.py). "absmax", the TensorRT target's, gives scales > 0 and
    codes in [-(2^(b-1) - 1), 2^(b-1) - 1]; "peak" (onnxruntime's) signed scales, codes from -2^(b-1)."""
    if rule not in ("peak", "absmax"):
        raise ValueError(f"unknown weight rule {rule!r}; accepted: 'peak' (onnxruntime), 'absmax' (tensorrt)")
    k, n = w_t.shape
    z = np.float32(2 ** (bits - 1))
    w = w_t.astype(np.float32)
    q = np.empty((k, n), dtype=np.int8)
    scales = np.empty((-(-k // group), n), dtype=np.float32)
    for b, s in enumerate(range(0, k, group)):
        blk = w[s:s + group]
        if rule == "absmax":
            scale = (np.abs(blk).max(axis=0) / (z - np.float32(1))).astype(np.float32)
            scale[~(scale > 0)] = 1
            q[s:s + group] = np.clip(np.round(blk / scale), 1 - z, z - 1).astype(np.int8)
        else:
            hi, lo = blk.max(axis=0), blk.min(axis=0)
            scale = (np.where(np.abs(hi) > np.abs(lo), hi, lo) / -z).astype(np.float32)
            inv = np.zeros_like(scale)
            inv[scale != 0] = np.float32(1) / scale[scale != 0]
            q[s:s + group] = (np.clip(np.floor(blk * inv + z + np.float32(0.5)), 0, 2 * z - 1) - z).astype(np.int8)
        scales[b] = scale
    return q, scales


def quantize_weight_only_qdq(model: onnx.ModelProto, layers: dict[str, str], recipe: WeightOnlyRecipe) -> onnx.ModelProto:
    """The TensorRT form of a weight-only recipe: the weight stored as INT8 (per output channel,
    DequantizeLinear axis=1) or INT4 (blockwise along K, DequantizeLinear block_size, opset 21)
    feeding the unchanged MatMul; scales under the recipe's rule ("absmax": positive, as TensorRT
    requires)."""
    import ml_dtypes

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for node in list(g.node):
        layer = layers.get(node.name)
        if layer is None:
            continue
        r = recipe.head_recipe() if layer == "lm_head" else recipe
        base = node.input[1]
        w_t = numpy_helper.to_array(inits[base])
        k = w_t.shape[0]
        group = r.group_for(k)
        q, scales = symmetric_codes(w_t, r.bits, group, r.scale_rule)
        g.initializer.remove(inits[base])
        if r.granularity == "per-channel":
            codes, attrs, scale = q, {"axis": 1}, scales[0]
        else:
            codes, attrs, scale = q.astype(ml_dtypes.int4), {"axis": 0, "block_size": group}, scales
        suffix = f"_i{r.bits}"
        g.initializer.extend([numpy_helper.from_array(codes, base + suffix),
                              numpy_helper.from_array(scale, base + suffix + "_scale")])
        dq = helper.make_node("DequantizeLinear", [base + suffix, base + suffix + "_scale"], [base + "_dq"],
                              name=f"{node.name}/dequantize_weight", **attrs)
        g.node.insert(list(g.node).index(node), dq)
        node.input[1] = base + "_dq"
    _require_opset(model, 21)
    return model


def component_of(initializer: str) -> str:
    if initializer.startswith("transformer.blocks."):
        return "transformer_layers"
    if initializer.startswith("lm_head"):
        return "lm_head"
    return "other"


def initializer_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the graph's constant tensors per component (by the names given above)."""
    out: dict[str, int] = {}
    packed = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)  # two codes per byte
    for t in model.graph.initializer:
        count = int(np.prod(t.dims, dtype=np.int64))
        n = (count + 1) // 2 if t.data_type in packed else count * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        out[component_of(t.name)] = out.get(component_of(t.name), 0) + n
    return out
