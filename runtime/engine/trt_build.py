"""Build TensorRT engines INTO a bundle (``molmoact-edge build``): a thin adapter over TensorRT's
Python API. NEVER RUN HERE: no machine this project runs on has TensorRT (README: "What has
never run"). Everything that is not a TensorRT call is plain logic tested on CPU: the profiles
(trt_profiles.py), the cache key and engine selection (trt_engines.py), and :func:`add_engines`,
which writes the engine entries into the manifest.

Per graph (``vision`` and the static-cache ``llm_static``): parse the ONNX file with TensorRT's
parser; a strongly typed network when the graph holds Q/DQ nodes (their types decide the
precision), FP16 builder flag for an fp16 bundle, FP32 (TF32 off) for fp32; one optimisation profile per token-count range; a timing
cache read from and written back to ``--timing-cache``; the serialized plan goes to
``engines/<key>/<graph>.plan`` with ``engine.json`` beside it, both hashed in the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from molmoact_edge.runtime.engine.bundle import Bundle, sha256_file
from molmoact_edge.runtime.engine.deps import import_backend
from molmoact_edge.runtime.engine.manifest import MANIFEST, BundleError, Manifest
from molmoact_edge.runtime.engine.trt_engines import ENGINES_DIR, Device, cache_key, content_hash
from molmoact_edge.runtime.engine.trt_profiles import LLM_GRAPH, Profile, llm_profiles, vision_profiles

GRAPHS = ("vision", LLM_GRAPH)


def import_tensorrt():
    """TensorRT, or at once an error naming what to install (pip extra; JetPack ships it via apt)."""
    return import_backend("tensorrt", "tensorrt (on a Jetson: apt-get install python3-libnvinfer from JetPack)",
                          extra="tensorrt")


def precision(bundle: Bundle, graph: str) -> str:
    """strongly-typed (Q/DQ graphs: their types decide), fp16 (an fp16 bundle: FP16 builder flag) or
    fp32 (an fp32 bundle, TF32 off: what the parity test on the fixtures needs)."""
    q = bundle.manifest.quantization
    if graph != "vision" and q is not None and q.get("target") == "tensorrt" and q.get("scheme") != "fp16":
        return f"strongly-typed {q.get('scheme')}"
    return "fp16" if bundle.manifest.dtype == "fp16" else "fp32"


def add_engines(bundle_path: Path, manifest: Manifest, entries: list[dict]) -> Manifest:
    """Record engines already written under ``bundle_path/engines/``: hash their files, add the entries
    (replacing any of the same file), and rewrite manifest.json atomically."""
    files = dict(manifest.files)
    for e in entries:
        for rel in (e["file"], e["manifest"]):
            files[rel] = sha256_file(bundle_path / rel)
    kept = [e for e in manifest.engines if e["file"] not in {n["file"] for n in entries}]
    new = dataclasses.replace(manifest, files=files, engines=tuple(kept + entries))
    text = json.dumps(new.to_json(), indent=2)
    Manifest.from_json(json.loads(text))  # the reader's own checks, before it replaces the old one
    tmp = bundle_path / f".{MANIFEST}.tmp"
    tmp.write_text(text)
    os.replace(tmp, bundle_path / MANIFEST)
    return new


def current_device(trt) -> Device:
    from molmoact_edge.runtime.engine.cuda_mem import device_properties

    name, cc = device_properties()
    return Device(tensorrt=trt.__version__, gpu=name, compute_capability=cc)


def _build_one(trt, logger, path: Path, profiles: list[Profile], spec, prec: str, cache_bytes: bytes):
    builder = trt.Builder(logger)
    strongly_typed = prec.startswith("strongly")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"TensorRT could not parse {path}: {errors} (run `molmoact-edge build --check-only`)")
    config = builder.create_builder_config()
    if prec == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif prec == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes(spec.inputs).items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BundleError(f"TensorRT failed to build an engine from {path} (see its log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def build_engines(bundle: Bundle, max_seq_len: int, max_verify: int, timing_cache: Path | None = None,
                  progress: Callable[[str], None] | None = None) -> Manifest:
    say = progress or (lambda s: print(s, file=sys.stderr, flush=True))
    trt = import_tensorrt()
    m = bundle.manifest
    if LLM_GRAPH not in m.graphs:
        raise BundleError(f"{bundle.path} has no {LLM_GRAPH!r} graph, which the GPU engines are built from; "
                          "re-export with `molmoact-edge export --static-kv ...`")
    device = current_device(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    content = content_hash(m)
    plans = {"vision": vision_profiles(), LLM_GRAPH: llm_profiles(max_seq_len, max_verify)}
    entries, t0 = [], time.perf_counter()
    for i, graph in enumerate(GRAPHS, 1):
        prec = precision(bundle, graph)
        profiles = [p.to_json() for p in plans[graph]]
        key = cache_key(content, graph, device, prec, profiles)
        folder = bundle.path / ENGINES_DIR / key
        say(f"[{i}/{len(GRAPHS)}] building {graph} ({prec}, profiles {[p['name'] for p in profiles]}) on {device.gpu} "
            f"with TensorRT {device.tensorrt}: minutes on an Orin (t = {time.perf_counter() - t0:.0f} s)")
        plan, cache_bytes = _build_one(trt, logger, bundle.file(m.graphs[graph].file), plans[graph], m.graphs[graph],
                                       prec, cache_bytes)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            (folder / f"{graph}.plan").write_bytes(plan)
            entry = {"file": f"{ENGINES_DIR}/{key}/{graph}.plan", "manifest": f"{ENGINES_DIR}/{key}/engine.json",
                     "graph": graph, "key": key, "tensorrt": device.tensorrt, "gpu": device.gpu,
                     "compute_capability": device.compute_capability, "bundle_content": content, "precision": prec,
                     "profiles": profiles, "max_seq_len": max_seq_len, "max_verify": max_verify}
            (folder / "engine.json").write_text(json.dumps(entry, indent=2))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        entries.append(entry)
        if timing_cache:
            timing_cache.write_bytes(cache_bytes)
    say(f"recording {len(entries)} engines in {bundle.path / MANIFEST} (t = {time.perf_counter() - t0:.0f} s)")
    return add_engines(bundle.path, m, entries)
