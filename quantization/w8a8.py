"""The ONNX side of ``w8a8-sq``: INT8 weights per output channel and static INT8 activations per
tensor on every transformer-layer MatMul of an (already smoothed) LLM graph.

- ``onnxruntime`` target: onnxruntime's own ``quantize_static`` (QDQ format, MinMax calibration fed
  by :class:`PrefillReader` with our calibration split's prefill embeddings), restricted to the
  transformer-layer MatMuls by node name. onnxruntime's CPU EP fuses each DequantizeLinear pair into
  its integer ``MatMulIntegerToFloat`` kernel. The activation scales it chose are read back from
  the graph so that the simulation can use them.
- ``tensorrt`` target: written here, the explicit form TensorRT builds INT8 engines from:
  symmetric int8 QuantizeLinear/DequantizeLinear (zero point 0) on the input, int8 weight codes
  with a per-output-channel DequantizeLinear (axis 1) into the unchanged MatMul.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

UINT8 = (0, 255)
INT8 = (-128, 127)


class PrefillReader:
    """onnxruntime ``CalibrationDataReader``: one prefill per calibration sample (no past)."""

    def __init__(self, model: onnx.ModelProto, embeds, layers: int, kv_heads: int, head_dim: int):
        self.embeds, self.i = list(embeds), 0
        self.past = np.zeros((0, layers, 2, kv_heads, head_dim), dtype=np.float32)
        self.names = {i.name for i in model.graph.input}

    def get_next(self):
        if self.i >= len(self.embeds):
            return None
        x = self.embeds[self.i].astype(np.float32)
        self.i += 1
        t = x.shape[1]
        feed = {"inputs_embeds": x, "position_ids": np.arange(t, dtype=np.int64), "past_kv": self.past,
                "logits_index": np.array([t - 1], dtype=np.int64)}
        return {k: v for k, v in feed.items() if k in self.names}

    def rewind(self):
        self.i = 0


def int8_channel_codes(w_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float weight -> (int8 codes [K, N], float32 scales [N]): onnxruntime's quantiser's
    symmetric per-channel rule (scale = 2 absmax / 254 in float64, codes round(w / scale), ties to even)."""
    w = w_t.astype(np.float32)
    scale = (2 * np.abs(w).max(axis=0).astype(np.float64) / 254).astype(np.float32)
    scale[scale == 0] = 1
    return np.clip(np.round(w / scale[None, :]), -127, 127).astype(np.int8), scale


def quantize_static_ort(model: onnx.ModelProto, layers: dict[str, str], reader: PrefillReader,
                        work: Path) -> tuple[onnx.ModelProto, dict[str, tuple[float, int, int, int]]]:
    """onnxruntime's ``quantize_static`` on the named transformer-layer MatMuls; returns the graph and
    layer -> (activation scale, zero point, qmin, qmax) as onnxruntime chose them."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    nodes = sorted(n for n, layer in layers.items() if layer != "lm_head")
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "smoothed.onnx", work / "w8a8.onnx"
    from molmoact_edge.quantization.onnx_passes import initializer_bytes

    big = sum(initializer_bytes(model).values()) > 1 << 30  # protobuf cannot serialise 2 GiB: weights in a side file
    onnx.save(model, str(src), save_as_external_data=big, location=src.name + ".data" if big else None)
    log = logging.getLogger()
    level = log.level
    log.setLevel(logging.ERROR)  # the quantiser logs per node, and advises a pre-processing our graphs do not need
    try:
        quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        nodes_to_quantize=nodes, per_channel=True, reduce_range=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=big,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                       # the recipe quantises linear inputs only: MatMul outputs stay float
                                       "OpTypesToExcludeOutputQuantization": ["MatMul"]})
    finally:
        log.setLevel(level)
    out = onnx.load(str(dst))
    return out, activation_params(out, layers)


def activation_params(model: onnx.ModelProto, layers: dict[str, str]) -> dict[str, tuple[float, int, int, int]]:
    """For each quantised layer: the QuantizeLinear in front of its MatMul's input -> its parameters."""
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out = {}
    for node in g.node:
        layer = layers.get(node.name)
        if layer is None or layer == "lm_head":
            continue
        dq = producer.get(node.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            raise ValueError(f"layer {layer}: no QuantizeLinear/DequantizeLinear in front of its input; "
                             "onnxruntime's quantiser left it float")
        scale, zp = inits[q.input[1]], inits[q.input[2]]
        lo, hi = UINT8 if zp.dtype == np.uint8 else INT8
        out[layer] = (float(scale), int(zp), lo, hi)
    return out


def quantize_w8a8_qdq(model: onnx.ModelProto, layers: dict[str, str], act_amax: dict[str, float]) -> onnx.ModelProto:
    """TensorRT form: symmetric int8 Q/DQ (scale = amax / 127) on each transformer-layer input and
    int8 weight codes with a per-channel DequantizeLinear."""
    from molmoact_edge.quantization.onnx_passes import _require_opset, insert_static_qdq

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for node in list(g.node):
        layer = layers.get(node.name)
        if layer is None or layer == "lm_head":
            continue
        base = node.input[1]
        codes, w_scale = int8_channel_codes(numpy_helper.to_array(inits[base]))
        a_scale = np.array(np.float32(act_amax[layer]) / np.float32(127), dtype=np.float32)
        insert_static_qdq(g, node, layer, inits[base], "i8", codes, w_scale, a_scale, np.zeros((), np.int8))
    _require_opset(model, 21)
    return model


def tensorrt_act_quant(act_amax: dict[str, float]) -> dict[str, tuple[float, int, int, int]]:
    """The TensorRT form's activation parameters, as the simulation reads them."""
    return {k: (float(np.float32(v) / np.float32(127)), 0, *INT8) for k, v in act_amax.items()}
