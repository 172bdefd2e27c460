"""The bundle manifest schema: the one definition that the exporter writes and the runtime reads.

``manifest.json`` is :meth:`Manifest.to_json`; reading it back is :meth:`Manifest.from_json`, which
checks every field's type and that every path it names stays inside the bundle (relative, no
``..``, no absolute or Windows-style path). What the files hold is checked by the loader
(runtime/engine/bundle.py), which compares the manifest against the graphs and configs.

Versioning: ``format_version`` is bumped whenever a field changes meaning or a reader would have
to understand a new field to run the bundle correctly. A reader refuses a manifest with top-level
fields it does not know, so nothing a newer writer added is ever silently ignored. Two optional
places are reserved for the next writers, both absent in a plain fp32/fp16 export:

- ``quantization``: the recipe of a quantised bundle, a JSON object (scheme, granularity, group
  size, layers kept in higher precision, calibration-set sha256, bytes per component);
- ``engines``: compiled engines (e.g. TensorRT plans), a list of JSON objects each with a
  ``file`` inside the bundle (hashed in ``files`` like every other file) and its target (GPU,
  compute capability, TensorRT version).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

FORMAT = "molmoact-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KV_LAYOUT = ("positions", "layers", "kv", "kv_heads", "head_dim")
# Bundle dtype -> the numpy dtype of the LLM graph's embeddings and KV cache.
COMPUTE_DTYPES = {"fp32": "float32", "fp16": "float16"}
# Files every bundle carries that the runtime reads by these names (besides graphs and embeddings).
CONFIG_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json")

_SHA256 = re.compile(r"[0-9a-f]{64}")


class BundleError(ValueError):
    """A bundle that cannot be used as it is; the message says what is wrong and how to fix it."""


class ManifestVersionError(BundleError):
    """A manifest of another format version, or with fields this version does not know."""


def check_relpath(rel: Any, where: str) -> str:
    """A path inside the bundle: relative, forward slashes, normalised, never leaving the folder."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{where} must be a non-empty relative path, got {rel!r}")
    if "\\" in rel or "\0" in rel or re.match(r"^[A-Za-z]:", rel):
        raise BundleError(f"{where} = {rel!r} is not a portable relative path (use '/' and no drive letter)")
    if rel.startswith("/"):
        raise BundleError(f"{where} = {rel!r} is an absolute path; a bundle names only files inside its folder")
    if ".." in rel.split("/"):
        raise BundleError(f"{where} = {rel!r} leads out of the bundle ('..'); a bundle names only files inside its folder")
    if posixpath.normpath(rel) != rel:
        raise BundleError(f"{where} = {rel!r} is not normalised (write {posixpath.normpath(rel)!r})")
    return rel


def _obj(d: Any, where: str) -> dict:
    if not isinstance(d, dict):
        raise BundleError(f"{where} must be a JSON object, got {type(d).__name__}")
    return d


def _get(d: dict, key: str, prefix: str) -> Any:
    """``d[key]``; ``prefix`` is the dotted path of ``d`` in the manifest ("" or "model.")."""
    if key not in d:
        raise BundleError(f"missing field '{prefix}{key}'")
    return d[key]


def _int(v: Any, where: str, minimum: int = 1) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise BundleError(f"{where} must be an integer >= {minimum}, got {v!r}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise BundleError(f"{where} must be a non-empty string, got {v!r}")
    return v


def _dims(v: Any, where: str) -> tuple:
    """A shape: fixed dims as ints >= 0, symbolic dims as names."""
    if not isinstance(v, list) or not all(
            (isinstance(x, int) and not isinstance(x, bool) and x >= 0) or (isinstance(x, str) and x) for x in v):
        raise BundleError(f"{where} must be a list of sizes (ints) or dimension names (strings), got {v!r}")
    return tuple(v)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints for fixed dims, strings for symbolic ones

    @classmethod
    def from_json(cls, d: Any, where: str) -> TensorSpec:
        d = _obj(d, where)
        return cls(_str(_get(d, "name", f"{where}."), f"{where}.name"),
                   _str(_get(d, "dtype", f"{where}."), f"{where}.dtype"),
                   _dims(_get(d, "shape", f"{where}."), f"{where}.shape"))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


# How an LLM graph reads the KV cache (both over the one position-major buffer of ``kv_cache``):
# "prefix": ``past_kv`` is the filled rows only (its length grows per token; the CPU path);
# "full": ``kv_cache`` is the whole preallocated buffer and the position masks it in the graph
# (static shapes per q: what a GPU captures in a CUDA graph). A graph without the field is "prefix".
KV_INPUTS = ("prefix", "full")
LLM_GRAPHS = {"llm": "prefix", "llm_static": "full"}


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Set where this graph's ONNX opset differs from the bundle's (a quantiser's Q/DQ graph needs 21).
    opset: int | None = None
    kv_input: str | None = None  # one of KV_INPUTS; None (older bundles) means "prefix"
    serves_q: tuple[int, int] | None = None  # the token counts q (min, max) the graph is exported for

    @classmethod
    def from_json(cls, d: Any, where: str) -> GraphSpec:
        d = _obj(d, where)
        specs = {}
        for kind in ("inputs", "outputs"):
            items = _get(d, kind, f"{where}.")
            if not isinstance(items, list):
                raise BundleError(f"{where}.{kind} must be a list")
            specs[kind] = tuple(TensorSpec.from_json(x, f"{where}.{kind}[{i}]") for i, x in enumerate(items))
        opset = d.get("opset")
        kv_input = d.get("kv_input")
        if kv_input is not None and kv_input not in KV_INPUTS:
            raise BundleError(f"{where}.kv_input {kv_input!r} is not one of {list(KV_INPUTS)}")
        q = d.get("serves_q")
        if q is not None:
            if not isinstance(q, list) or len(q) != 2:
                raise BundleError(f"{where}.serves_q must be [min_q, max_q], got {q!r}")
            q = (_int(q[0], f"{where}.serves_q[0]"), _int(q[1], f"{where}.serves_q[1]"))
            if q[0] > q[1]:
                raise BundleError(f"{where}.serves_q {list(q)} has min > max")
        return cls(check_relpath(_get(d, "file", f"{where}."), f"{where}.file"), specs["inputs"], specs["outputs"],
                   None if opset is None else _int(opset, f"{where}.opset"), kv_input, q)

    def to_json(self) -> dict:
        d = {"file": self.file, "inputs": [t.to_json() for t in self.inputs],
             "outputs": [t.to_json() for t in self.outputs]}
        if self.opset is not None:
            d["opset"] = self.opset
        if self.kv_input is not None:
            d["kv_input"] = self.kv_input
        if self.serves_q is not None:
            d["serves_q"] = list(self.serves_q)
        return d

    def tensor(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs + self.outputs if t.name == name), None)


@dataclass(frozen=True)
class ModelDims:
    """The model's dimensions as exported; the loader holds them against config.json and the graphs."""

    hidden_size: int
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    input_vocab_size: int
    image_patch_id: int
    max_position_embeddings: int

    @classmethod
    def from_json(cls, d: Any, where: str = "model") -> ModelDims:
        d = _obj(d, where)
        return cls(**{f: _int(_get(d, f, f"{where}."), f"{where}.{f}", 0 if f == "image_patch_id" else 1)
                      for f in cls.__dataclass_fields__})

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class KvCacheSpec:
    dtype: str
    shape: tuple  # ("positions", layers, 2, kv_heads, head_dim)
    layout: tuple = KV_LAYOUT

    @classmethod
    def from_json(cls, d: Any, where: str = "kv_cache") -> KvCacheSpec:
        d = _obj(d, where)
        layout = _get(d, "layout", f"{where}.")
        if not isinstance(layout, list) or tuple(layout) != KV_LAYOUT:
            raise BundleError(f"{where}.layout {layout!r} is not {list(KV_LAYOUT)} (the only layout this runtime reads)")
        return cls(_str(_get(d, "dtype", f"{where}."), f"{where}.dtype"), _dims(_get(d, "shape", f"{where}."), f"{where}.shape"),
                   tuple(layout))

    def to_json(self) -> dict:
        return {"layout": list(self.layout), "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class EmbeddingsSpec:
    """The input embedding table (``.npy``), looked up on the host."""

    file: str
    dtype: str
    shape: tuple[int, int]

    @classmethod
    def from_json(cls, d: Any, where: str = "embeddings") -> EmbeddingsSpec:
        d = _obj(d, where)
        shape = _dims(_get(d, "shape", f"{where}."), f"{where}.shape")
        if len(shape) != 2 or not all(isinstance(x, int) for x in shape):
            raise BundleError(f"{where}.shape must be [rows, hidden_size], got {list(shape)}")
        return cls(check_relpath(_get(d, "file", f"{where}."), f"{where}.file"),
                   _str(_get(d, "dtype", f"{where}."), f"{where}.dtype"), shape)

    def to_json(self) -> dict:
        return {"file": self.file, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Manifest:
    """Everything a bundle says about itself. ``files`` maps every file in the bundle (relative
    path) to its sha256; the runtime reads nothing that is not listed there."""

    dtype: str  # one of COMPUTE_DTYPES
    opset: int
    model: ModelDims
    graphs: dict[str, GraphSpec]
    kv_cache: KvCacheSpec
    embeddings: EmbeddingsSpec
    files: dict[str, str]
    tokenizer: str = "tokenizer.json"
    norm_stats: str = "norm_stats.json"
    source_checkpoint: dict[str, Any] = field(default_factory=dict)  # {"path": ..., "sha256": {name: hex}}
    tools: dict[str, str] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    engines: tuple[dict[str, Any], ...] = ()
    format_version: int = FORMAT_VERSION

    @property
    def compute_dtype(self) -> str:
        return COMPUTE_DTYPES[self.dtype]

    def read_files(self) -> list[str]:
        """Every file the runtime reads from the bundle (each must be hashed in ``files``)."""
        names = [g.file for g in self.graphs.values()] + [self.embeddings.file, self.tokenizer, self.norm_stats]
        names += list(CONFIG_FILES) + [e["file"] for e in self.engines]
        return list(dict.fromkeys(names))

    @classmethod
    def from_json(cls, raw: Any) -> Manifest:
        raw = _obj(raw, "the manifest")
        if raw.get("format") != FORMAT:
            raise BundleError(f"format is {raw.get('format')!r}, expected {FORMAT!r}: not a molmoact-edge bundle")
        version = raw.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:  # (true == 1 in Python)
            raise ManifestVersionError(f"bundle format version {version!r}, but this molmoact-edge reads version {FORMAT_VERSION}")
        known = {"format"} | set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ManifestVersionError(f"unknown field(s) {unknown}: written by a newer molmoact-edge? (known: {sorted(known)})")
        dtype = _get(raw, "dtype", "")
        if not isinstance(dtype, str) or dtype not in COMPUTE_DTYPES:
            raise BundleError(f"dtype {dtype!r} is not one of {sorted(COMPUTE_DTYPES)}")
        files = _obj(_get(raw, "files", ""), "files")
        for rel, digest in files.items():
            check_relpath(rel, "files entry")
            if rel == MANIFEST:
                raise BundleError("files lists manifest.json itself; its hash is pinned from outside (--bundle-sha256)")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise BundleError(f"files[{rel!r}] must be a lowercase sha256 hex digest, got {digest!r}")
        graphs = {name: GraphSpec.from_json(g, f"graphs.{name}")
                  for name, g in _obj(_get(raw, "graphs", ""), "graphs").items()}
        engines = raw.get("engines", [])
        if not isinstance(engines, list):
            raise BundleError("engines must be a list of JSON objects")
        for i, e in enumerate(engines):
            check_relpath(_get(_obj(e, f"engines[{i}]"), "file", f"engines[{i}]."), f"engines[{i}].file")
        quant = raw.get("quantization")
        if quant is not None:
            _obj(quant, "quantization")
        tools = _obj(raw.get("tools", {}), "tools")
        return cls(
            dtype=dtype, opset=_int(_get(raw, "opset", ""), "opset"), model=ModelDims.from_json(_get(raw, "model", "")),
            graphs=graphs, kv_cache=KvCacheSpec.from_json(_get(raw, "kv_cache", "")),
            embeddings=EmbeddingsSpec.from_json(_get(raw, "embeddings", "")), files=dict(files),
            tokenizer=check_relpath(raw.get("tokenizer", "tokenizer.json"), "tokenizer"),
            norm_stats=check_relpath(raw.get("norm_stats", "norm_stats.json"), "norm_stats"),
            source_checkpoint=_obj(raw.get("source_checkpoint", {}), "source_checkpoint"),
            tools={str(k): str(v) for k, v in tools.items()}, quantization=quant, engines=tuple(engines),
            format_version=version)

    def to_json(self) -> dict:
        d = {"format": FORMAT, "format_version": self.format_version, "dtype": self.dtype, "opset": self.opset,
             "model": self.model.to_json(), "graphs": {k: g.to_json() for k, g in self.graphs.items()},
             "kv_cache": self.kv_cache.to_json(), "embeddings": self.embeddings.to_json(),
             "tokenizer": self.tokenizer, "norm_stats": self.norm_stats,
             "source_checkpoint": self.source_checkpoint, "tools": self.tools}
        if self.quantization is not None:
            d["quantization"] = self.quantization
        if self.engines:
            d["engines"] = list(self.engines)
        d["files"] = dict(sorted(self.files.items()))
        return d
