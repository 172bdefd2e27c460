"""A bundle: the self-describing directory the robot loads instead of a checkpoint.

``manifest.json`` records the format version, the model's dimensions, the graphs' input/output
signatures, the KV-cache layout, dtypes, opset, the hash of every file, the source checkpoint's
hash and the tool versions. :func:`load_manifest` checks all of it before anything runs, and
refuses a mismatch with a message that says what is wrong and how to fix it. Nothing is inferred
from file names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molmoact_edge.runtime.engine.config import ModelConfig

FORMAT = "molmoact-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KV_LAYOUT = ("positions", "layers", "kv", "kv_heads", "head_dim")


class BundleError(ValueError):
    """A bundle that cannot be used as it is; the message says what is wrong and how to fix it."""


def _reexport(path: Path) -> str:
    return f"re-export it with `molmoact-edge export --checkpoint CHECKPOINT --out {path}`"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints for fixed dims, strings for symbolic ones

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_json(cls, d: dict) -> GraphSpec:
        return cls(d["file"], tuple(TensorSpec.from_json(x) for x in d["inputs"]),
                   tuple(TensorSpec.from_json(x) for x in d["outputs"]))

    def to_json(self) -> dict:
        return {"file": self.file, "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}


@dataclass(frozen=True)
class Manifest:
    path: Path  # the bundle directory
    dtype: str
    opset: int
    graphs: dict[str, GraphSpec]
    kv_dtype: str
    kv_shape: tuple  # ("positions", layers, 2, kv_heads, head_dim)
    embeddings_file: str
    embeddings_shape: tuple[int, int]
    files: dict[str, str]  # relative path -> sha256
    raw: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


def _require(d: dict, key: str, where: str, path: Path):
    if key not in d:
        raise BundleError(f"{path / MANIFEST}: missing {where}{key!r}; the manifest is damaged: {_reexport(path)}")
    return d[key]


def load_manifest(bundle_dir: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and check ``manifest.json`` and the files it lists (existence, sha256)."""
    path = Path(bundle_dir)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist; create it with "
                          f"`molmoact-edge export --checkpoint CHECKPOINT --out {path}`")
    if not mpath.exists():
        raise BundleError(f"{mpath} is missing: {path} is not a molmoact-edge bundle; {_reexport(path)}")
    try:
        raw = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}); {_reexport(path)}") from e
    if raw.get("format") != FORMAT:
        raise BundleError(f"{mpath}: format is {raw.get('format')!r}, expected {FORMAT!r}; not a molmoact-edge bundle")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{mpath}: bundle format version {version!r}, but this molmoact-edge reads version "
                          f"{FORMAT_VERSION}; {_reexport(path)} (or install the molmoact-edge that wrote it)")
    files = _require(raw, "files", "", path)
    for rel, digest in files.items():
        f = path / rel
        if not f.exists():
            raise BundleError(f"{path}: file {rel} listed in the manifest is missing; copy the complete bundle "
                              f"directory or {_reexport(path)}")
        if verify_hashes and sha256_file(f) != digest:
            raise BundleError(f"{path}: {rel} does not match its sha256 in the manifest (changed or corrupted "
                              f"after export); copy the bundle again or {_reexport(path)}")
    graphs = {name: GraphSpec.from_json(g) for name, g in _require(raw, "graphs", "", path).items()}
    for name in ("vision", "llm"):
        if name not in graphs:
            raise BundleError(f"{mpath}: no {name!r} graph; {_reexport(path)}")
    for name, g in graphs.items():
        if g.file not in files:
            raise BundleError(f"{mpath}: graph {name} file {g.file} is not hashed in 'files'; {_reexport(path)}")
    kv = _require(raw, "kv_cache", "", path)
    if tuple(kv.get("layout", ())) != KV_LAYOUT:
        raise BundleError(f"{mpath}: KV layout {kv.get('layout')} is not {list(KV_LAYOUT)}; {_reexport(path)}")
    emb = _require(raw, "embeddings", "", path)
    m = Manifest(path=path, dtype=_require(raw, "dtype", "", path), opset=int(_require(raw, "opset", "", path)),
                 graphs=graphs, kv_dtype=kv["dtype"], kv_shape=tuple(kv["shape"]), embeddings_file=emb["file"],
                 embeddings_shape=tuple(emb["shape"]), files=dict(files), raw=raw)
    _check_against_config(m)
    return m


def _check_against_config(m: Manifest) -> None:
    cfg = ModelConfig.load(m.path)
    llm = cfg.llm
    want_kv = ("positions", llm.num_hidden_layers, 2, llm.num_key_value_heads, llm.head_dim)
    if m.kv_shape != want_kv:
        raise BundleError(f"{m.path}: manifest KV shape {list(m.kv_shape)} does not match config.json "
                          f"{list(want_kv)}; {_reexport(m.path)}")
    if m.embeddings_shape != (llm.input_vocab_size, llm.hidden_size):
        raise BundleError(f"{m.path}: embeddings {list(m.embeddings_shape)} do not match config.json "
                          f"[{llm.input_vocab_size}, {llm.hidden_size}]; {_reexport(m.path)}")


def check_signature(name: str, spec: GraphSpec, actual_inputs, actual_outputs, path: Path) -> None:
    """Compare a loaded graph's I/O (name, dtype, rank, fixed dims) with the manifest."""

    def norm(items):
        return [(n, str(d), tuple(s)) for n, d, s in items]

    def describe(specs):
        return [(t.name, t.dtype, tuple(t.shape)) for t in specs]

    for kind, want, got in (("inputs", spec.inputs, actual_inputs), ("outputs", spec.outputs, actual_outputs)):
        got = norm(got)
        ok = len(want) == len(got)
        for w, (n, d, s) in zip(want, got):
            fixed_ok = len(w.shape) == len(s) and all(
                isinstance(a, str) or not isinstance(b, int) or a == b for a, b in zip(w.shape, s))
            ok = ok and w.name == n and w.dtype == d and fixed_ok
        if not ok:
            raise BundleError(f"{path}: graph {name!r} {kind} are {got}, but the manifest says {describe(want)}; "
                              f"the graph file does not belong to this manifest: {_reexport(path)}")
