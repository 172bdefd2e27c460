"""A bundle: the self-describing directory the robot loads instead of a checkpoint.

A bundle is exactly what its folder holds and its manifest lists (schema: runtime/engine/manifest.py).
:func:`load_manifest` refuses, with a message that says what is wrong and how to fix it:

- a path that leaves the folder (absolute, ``..``, a symlink pointing out) or is not a regular
  file (``/dev/zero``, a FIFO), and any file in the folder that the manifest does not list;
- a file the runtime reads that has no hash, or whose sha256 differs (``verify_hashes``), and a
  ``manifest.json`` whose own sha256 differs from the one a deployment pinned (``bundle_sha256``);
- a manifest field that disagrees with the graphs it describes (read from their protobuf: opset,
  inputs/outputs, external-data locations) or with ``config.json`` and the embedding table.

The embedding table is read on every token for the whole run, so it is not memory-mapped when
hashes are verified: :func:`load_embeddings` reads it into memory once, hashing exactly the bytes it
keeps (a file changed afterwards cannot change the running model).

What the hashes protect against is corruption (a bad copy, a truncated download, a disk error) and a
bundle assembled from mismatched parts. They do not protect against a deliberate edit: whoever can
write the folder can recompute the hashes. Against that, a deployment pins the manifest's own hash
(``--bundle-sha256``), which transitively pins every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from molmoact_edge.runtime.engine.config import ConfigError, ModelConfig
from molmoact_edge.runtime.engine.manifest import (  # noqa: F401  (re-exported: the bundle's public names)
    FORMAT,
    FORMAT_VERSION,
    KV_LAYOUT,
    MANIFEST,
    BundleError,
    GraphSpec,
    Manifest,
    ManifestVersionError,
    TensorSpec,
    check_relpath,
)
from molmoact_edge.runtime.engine.onnx_proto import GraphInfo, OnnxProtoError, read_graph_info

MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB; refuse to parse something that is not one


def _reexport(path: Path) -> str:
    return f"re-export it with `molmoact-edge export --checkpoint CHECKPOINT --out {path}`"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_sha256_pin(text: str) -> str:
    """A pinned manifest hash as given by a user: 64 hex digits (case-insensitive)."""
    pin = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", pin):
        raise BundleError(f"a bundle pin must be the 64 hex digits of `sha256sum BUNDLE/{MANIFEST}`, got {text!r}")
    return pin


@dataclass(frozen=True)
class Bundle:
    """A checked bundle: its folder, its manifest, and whether file hashes were verified."""

    path: Path
    manifest: Manifest
    manifest_sha256: str
    verified: bool  # hashes checked; the embedding table's is checked as it is read (load_embeddings)

    def file(self, rel: str) -> Path:
        return self.path / rel


def load_manifest(bundle_dir: str | Path, verify_hashes: bool = True, bundle_sha256: str | None = None) -> Bundle:
    """Read and check ``manifest.json``, the files it lists, the graphs and the configs."""
    path = Path(bundle_dir)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist; create it with "
                          f"`molmoact-edge export --checkpoint CHECKPOINT --out {path}`")
    if not os.path.lexists(mpath):
        raise BundleError(f"{mpath} is missing: {path} is not a molmoact-edge bundle; {_reexport(path)}")
    root = Path(os.path.realpath(path))
    _confined(root, MANIFEST, path)
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a bundle manifest; {_reexport(path)}")
    data = mpath.read_bytes()  # hashed and parsed from the same bytes
    digest = hashlib.sha256(data).hexdigest()
    pin = None if bundle_sha256 is None else check_sha256_pin(bundle_sha256)
    if pin is not None and digest != pin:
        raise BundleError(f"{mpath} has sha256 {digest}, not the pinned {pin}: this is not the bundle that was "
                          "pinned (or it was changed since); copy the pinned bundle again, or pin this one deliberately")
    try:
        manifest = Manifest.from_json(json.loads(data))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}); {_reexport(path)}") from e
    except ManifestVersionError as e:
        raise BundleError(f"{mpath}: {e}; {_reexport(path)} (or install the molmoact-edge that wrote it)") from None
    except BundleError as e:
        raise BundleError(f"{mpath}: {e}; {_reexport(path)}") from None
    _check_files(root, path, manifest)
    if verify_hashes:
        for rel in sorted(manifest.files):
            if rel != manifest.embeddings.file:  # hashed as it is read into memory: load_embeddings
                _verify(path, rel, manifest.files[rel])
    bundle = Bundle(path, manifest, digest, verify_hashes)
    # an optional static-cache LLM graph (export --static-kv) is checked like the others
    infos = {name: _graph_info(bundle, name) for name in ("vision", "llm", "llm_static")
             if name != "llm_static" or name in manifest.graphs}
    _check_against_graphs(bundle, infos)
    _check_against_config(bundle)
    _check_embeddings_header(bundle)
    return bundle


def _confined(root: Path, rel: str, path: Path) -> None:
    """``rel`` is a regular file whose real location is inside the bundle folder ``root``."""
    f = path / rel
    if not os.path.lexists(f):
        raise BundleError(f"{path}: file {rel} listed in the manifest is missing; copy the complete bundle "
                          f"directory or {_reexport(path)}")
    real = os.path.realpath(f)
    if os.path.commonpath([str(root), real]) != str(root):
        raise BundleError(f"{path}: {rel} is a link to {real}, outside the bundle; a bundle holds its own files: "
                          "copy them in (cp -rL) or re-export")
    if not stat.S_ISREG(os.stat(real).st_mode):
        raise BundleError(f"{path}: {rel} is not a regular file; a bundle holds only regular files: {_reexport(path)}")


def _check_files(root: Path, path: Path, m: Manifest) -> None:
    for rel in m.read_files():
        if rel not in m.files:
            raise BundleError(f"{path / MANIFEST}: {rel} is read by the runtime but has no sha256 in 'files'; "
                              f"every file a bundle uses must be hashed: {_reexport(path)}")
    for rel in m.files:
        _confined(root, rel, path)
    unlisted = []
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = Path(os.path.relpath(os.path.join(dirpath, name), path)).as_posix()
            if rel != MANIFEST and rel not in m.files:
                unlisted.append(rel)
    if unlisted:
        raise BundleError(f"{path}: {sorted(unlisted)[:5]} {'is' if len(unlisted) == 1 else 'are'} in the bundle folder "
                          "but not in its manifest; a bundle is exactly the files its manifest hashes: remove "
                          f"{'it' if len(unlisted) == 1 else 'them'} or {_reexport(path)}")


def _verify(path: Path, rel: str, digest: str) -> None:
    if sha256_file(path / rel) != digest:
        raise BundleError(f"{path}: {rel} does not match its sha256 in the manifest (changed or corrupted "
                          f"after export); copy the bundle again or {_reexport(path)}")


def _graph_info(b: Bundle, name: str) -> GraphInfo:
    spec = b.manifest.graphs.get(name)
    if spec is None:
        raise BundleError(f"{b.path / MANIFEST}: no {name!r} graph; {_reexport(b.path)}")
    try:
        info = read_graph_info(b.file(spec.file))
    except OnnxProtoError as e:
        raise BundleError(f"{b.file(spec.file)} is not a readable ONNX graph ({e}); {_reexport(b.path)}") from e
    for loc in sorted(info.external_locations):
        where = f"{spec.file}: external data location"
        try:
            rel = check_relpath(loc, where)
        except BundleError as e:
            raise BundleError(f"{b.path}: {e}; {_reexport(b.path)}") from None
        rel = posixpath.join(posixpath.dirname(spec.file), rel)
        if rel not in b.manifest.files:
            raise BundleError(f"{b.path}: {where} {loc!r} is not hashed in the manifest's 'files'; every file a "
                              f"bundle uses must be hashed: {_reexport(b.path)}")
    return info


def _lie(b: Bundle, field: str, value, truth: str) -> BundleError:
    return BundleError(f"{b.path / MANIFEST}: {field} = {value!r} but {truth}; the manifest does not describe this "
                       f"bundle (edited by hand?): {_reexport(b.path)}")


def _check_against_graphs(b: Bundle, infos: dict[str, GraphInfo]) -> None:
    m = b.manifest
    for name, info in infos.items():
        spec = m.graphs[name]
        opset, want = info.opsets.get(""), spec.opset or m.opset
        if opset != want:
            field = f"graphs.{name}.opset" if spec.opset else "opset"
            raise _lie(b, field, want, f"{spec.file} imports ONNX opset {opset}")
        for kind, want, got in (("inputs", spec.inputs, info.inputs), ("outputs", spec.outputs, info.outputs)):
            got_t = [(t.name, t.dtype, tuple(t.shape)) for t in got]
            want_t = [(t.name, t.dtype, tuple(t.shape)) for t in want]
            if got_t != want_t:
                raise BundleError(f"{b.path}: graph {name!r} {kind} are {got_t}, but the manifest says {want_t}; "
                                  f"the graph file does not belong to this manifest: {_reexport(b.path)}")
    d, llm, kv = m.model, m.graphs["llm"], m.kv_cache
    kv_tail = (d.layers, 2, d.kv_heads, d.head_dim)
    checks = [  # (manifest field, its value, graph tensor, what the tensor must show)
        ("dtype", m.dtype, "inputs_embeds", m.compute_dtype, None),
        ("kv_cache.dtype", kv.dtype, "past_kv", kv.dtype, None),
        ("kv_cache.dtype", kv.dtype, "new_kv", kv.dtype, None),
        ("model.hidden_size", d.hidden_size, "inputs_embeds", None, (d.hidden_size,)),
        ("model.layers, model.kv_heads, model.head_dim", kv_tail, "past_kv", None, kv_tail),
        ("model.layers, model.kv_heads, model.head_dim", kv_tail, "new_kv", None, kv_tail),
        ("model.vocab_size", d.vocab_size, "logits", None, (d.vocab_size,)),
    ]
    for field, value, tensor, dtype, tail in checks:
        t = llm.tensor(tensor)
        if t is None:
            raise _lie(b, "graphs.llm.file", llm.file, f"that graph has no {tensor!r} tensor")
        if dtype is not None and t.dtype != dtype:
            raise _lie(b, field, value, f"{llm.file}'s {tensor} is {t.dtype}")
        if tail is not None and tuple(t.shape[-len(tail):]) != tail:
            raise _lie(b, field, value, f"{llm.file}'s {tensor} has shape {list(t.shape)}")
    feats = m.graphs["vision"].tensor("image_features")
    if feats is None or feats.shape[-1:] != (d.hidden_size,):
        raise _lie(b, "model.hidden_size", d.hidden_size,
                   f"{m.graphs['vision'].file}'s image_features is {None if feats is None else list(feats.shape)}")


def _check_against_config(b: Bundle) -> None:
    m, path = b.manifest, b.path
    try:
        cfg = ModelConfig.load(path)
    except ConfigError as e:
        raise BundleError(f"{path}: {e}; {_reexport(path)}") from None
    llm = cfg.llm
    truth = {"hidden_size": llm.hidden_size, "layers": llm.num_hidden_layers, "kv_heads": llm.num_key_value_heads,
             "head_dim": llm.head_dim, "vocab_size": llm.vocab_size, "input_vocab_size": llm.input_vocab_size,
             "image_patch_id": cfg.image_patch_id, "max_position_embeddings": llm.max_position_embeddings}
    for name, want in truth.items():
        value = getattr(m.model, name)
        if value != want:
            raise _lie(b, f"model.{name}", value, f"config.json says {want}")
    want_kv = ("positions", llm.num_hidden_layers, 2, llm.num_key_value_heads, llm.head_dim)
    if m.kv_cache.shape != want_kv:
        raise BundleError(f"{path}: manifest KV shape {list(m.kv_cache.shape)} does not match config.json "
                          f"{list(want_kv)}; {_reexport(path)}")
    if m.kv_cache.dtype != m.compute_dtype:
        raise _lie(b, "kv_cache.dtype", m.kv_cache.dtype, f"a {m.dtype} bundle keeps its cache in {m.compute_dtype}")
    emb = m.embeddings
    if emb.shape != (llm.input_vocab_size, llm.hidden_size):
        raise BundleError(f"{path}: embeddings {list(emb.shape)} do not match config.json "
                          f"[{llm.input_vocab_size}, {llm.hidden_size}]; {_reexport(path)}")
    if emb.dtype != m.compute_dtype:
        raise _lie(b, "embeddings.dtype", emb.dtype, f"a {m.dtype} bundle looks up {m.compute_dtype} embeddings")


def _npy_header(f) -> tuple[np.dtype, tuple, bool, int]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return dtype, shape, fortran, f.tell()


def _check_embeddings_header(b: Bundle) -> tuple[np.dtype, tuple, int]:
    emb = b.manifest.embeddings
    f_path = b.file(emb.file)
    try:
        with open(f_path, "rb") as f:
            dtype, shape, fortran, offset = _npy_header(f)
    except ValueError as e:
        raise BundleError(f"{f_path} is not a .npy array ({e}); {_reexport(b.path)}") from e
    if fortran or dtype.hasobject or dtype.name != emb.dtype or tuple(shape) != emb.shape:
        raise _lie(b, "embeddings", emb.to_json(), f"{emb.file} holds a {dtype.name} array of shape {list(shape)}"
                   + (" in Fortran order" if fortran else ""))
    return dtype, tuple(shape), offset


def load_embeddings(b: Bundle, chunk: int = 1 << 22) -> np.ndarray:
    """The input embedding table. Verified bundles get a read-only in-memory copy whose bytes are the
    ones hashed (one pass: read + hash); unverified ones a memory map (nothing read up front)."""
    dtype, shape, offset = _check_embeddings_header(b)
    rel = b.manifest.embeddings.file
    if not b.verified:
        return np.load(b.file(rel), mmap_mode="r")
    table = np.empty(shape, dtype=dtype)
    buf = memoryview(table.reshape(-1).view(np.uint8))
    h = hashlib.sha256()
    with open(b.file(rel), "rb") as f:
        h.update(f.read(offset))
        pos = 0
        while pos < len(buf):
            n = f.readinto(buf[pos:pos + chunk])
            if not n:
                break
            h.update(buf[pos:pos + n])
            pos += n
        while rest := f.read(chunk):  # trailing bytes are part of the file the manifest hashed
            h.update(rest)
    if pos < len(buf) or h.hexdigest() != b.manifest.files[rel]:
        raise BundleError(f"{b.path}: {rel} does not match its sha256 in the manifest (changed or corrupted "
                          f"after export); copy the bundle again or {_reexport(b.path)}")
    table.flags.writeable = False
    return table


def check_signature(name: str, spec: GraphSpec, actual_inputs, actual_outputs, path: Path) -> None:
    """Compare a loaded graph's I/O as the inference library sees it (name, dtype, rank, fixed dims)
    with the manifest."""

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
