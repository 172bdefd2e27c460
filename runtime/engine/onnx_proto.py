"""What the bundle loader needs to know about an ONNX graph, read from its protobuf directly.

The runtime must not need the ``onnx`` package (it belongs to the export side, and a robot install
has only onnxruntime), and onnxruntime does not report a graph's opset or where its external data
lives. So this reads the few fields the loader checks straight from the protobuf wire format:
the opset imports, the graph inputs/outputs (name, element type, shape) and the ``location`` of
every tensor stored outside the file (initializers, constant attributes, sparse tensors, in
subgraphs and functions too). Tensor payloads are skipped by offset, never decoded or copied.
Field numbers are those of onnx/onnx.proto, stable since IR version 3.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

# TensorProto.DataType -> numpy dtype name (the types a graph I/O can have here)
ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "str",
              9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}


class OnnxProtoError(ValueError):
    """The file is not a well-formed ONNX model protobuf."""


@dataclass(frozen=True)
class ValueInfo:
    name: str
    dtype: str
    shape: tuple  # ints for fixed dims, strings for named ones (0 for a dim with neither, as onnx does)


@dataclass(frozen=True)
class GraphInfo:
    opsets: dict[str, int]  # domain ("" = the default ONNX domain) -> version
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]
    external_locations: frozenset[str]  # as written in the graph, relative to the graph's folder


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end:
            raise OnnxProtoError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise OnnxProtoError("varint longer than 64 bits")


def _fields(buf, start: int, end: int):
    """(field number, value) pairs of one message; length-delimited values as (start, end) offsets."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + n), pos + n
        else:
            raise OnnxProtoError(f"unsupported wire type {wire} (field {number})")
        if pos > end:
            raise OnnxProtoError(f"field {number} runs past the end of its message")
        yield number, value


def _text(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


def _value_info(buf, span) -> ValueInfo:
    name, elem, dims = "", 0, []
    for f, v in _fields(buf, *span):
        if f == 1:
            name = _text(buf, v)
        elif f == 2:  # TypeProto
            for tf, tv in _fields(buf, *v):
                if tf != 1:  # only tensor types carry what the loader checks
                    continue
                for ef, ev in _fields(buf, *tv):
                    if ef == 1:
                        elem = ev
                    elif ef == 2:  # TensorShapeProto
                        for sf, sv in _fields(buf, *ev):
                            if sf == 1:
                                dim: int | str = 0
                                for df, dv in _fields(buf, *sv):
                                    if df == 1:
                                        dim = dv
                                    elif df == 2:
                                        dim = _text(buf, dv)
                                dims.append(dim)
    return ValueInfo(name, ELEM_TYPES.get(elem, f"onnx-type-{elem}"), tuple(dims))


class _Reader:
    def __init__(self, buf):
        self.buf = buf
        self.locations: set[str] = set()

    def tensor(self, span) -> None:
        for f, v in _fields(self.buf, *span):
            if f == 13:  # external_data: StringStringEntryProto {key = 1, value = 2}
                entry = {k: _text(self.buf, s) for k, s in _fields(self.buf, *v)}
                if entry.get(1) == "location":
                    self.locations.add(entry.get(2, ""))

    def sparse(self, span) -> None:
        for f, v in _fields(self.buf, *span):
            if f in (1, 2):  # values, indices
                self.tensor(v)

    def node(self, span) -> None:
        for f, v in _fields(self.buf, *span):
            if f == 5:  # AttributeProto
                for af, av in _fields(self.buf, *v):
                    if af in (5, 10):  # t, tensors
                        self.tensor(av)
                    elif af in (6, 11):  # g, graphs
                        self.graph(av)
                    elif af in (22, 23):  # sparse_tensor, sparse_tensors
                        self.sparse(av)

    def graph(self, span, io: dict | None = None) -> None:
        for f, v in _fields(self.buf, *span):
            if f == 1:
                self.node(v)
            elif f == 5:
                self.tensor(v)
            elif f == 15:
                self.sparse(v)
            elif io is not None and f in (11, 12):
                io[f].append(_value_info(self.buf, v))


def parse_model(buf) -> GraphInfo:
    """Read a serialized ModelProto (bytes, memoryview or mmap)."""
    r = _Reader(buf)
    opsets: dict[str, int] = {}
    io: dict[int, list] = {11: [], 12: []}
    seen_graph = False
    for f, v in _fields(buf, 0, len(buf)):
        if f == 8:  # opset_import: OperatorSetIdProto {domain = 1, version = 2}
            domain, version = "", 0
            for of, ov in _fields(buf, *v):
                if of == 1:
                    domain = _text(buf, ov)
                elif of == 2:
                    version = ov
            opsets["" if domain == "ai.onnx" else domain] = version
        elif f == 7:
            seen_graph = True
            r.graph(v, io)
        elif f == 25:  # functions: FunctionProto.node = 7
            for ff, fv in _fields(buf, *v):
                if ff == 7:
                    r.node(fv)
    if not seen_graph:
        raise OnnxProtoError("no graph in the model")
    return GraphInfo(opsets, tuple(io[11]), tuple(io[12]), frozenset(r.locations))


def read_graph_info(path: Path) -> GraphInfo:
    """:func:`parse_model` over a memory map of ``path`` (payloads are skipped, so little is paged in)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise OnnxProtoError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return parse_model(m)
