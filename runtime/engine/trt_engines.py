"""Which of a bundle's TensorRT engines may run here: pure logic over the manifest's ``engines``.

A TensorRT plan runs only on the TensorRT version that built it and on GPUs of the compute
capability it was built for, and it is only right for the graphs it was built from. Each engine
entry (written by ``molmoact-edge build``) records those; :func:`select_engines` picks, per graph,
the engine built for this device and this bundle's graphs, and refuses with the reason and the fix
when there is none (a stale engine, or one built elsewhere, is never loaded).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from molmoact_edge.runtime.engine.manifest import BundleError, Manifest

ENGINES_DIR = "engines"


class EngineError(BundleError):
    """No engine in the bundle fits this device or these graphs; the message says how to build one."""


@dataclass(frozen=True)
class Device:
    tensorrt: str  # tensorrt.__version__, e.g. "10.3.0.30"
    gpu: str  # e.g. "Orin"
    compute_capability: str  # "8.7"


def content_hash(manifest: Manifest) -> str:
    """What an engine was built from: the hashes of every bundle file outside engines/ (the
    manifest's own hash changes whenever an engine is added, so it cannot be used)."""
    files = {k: v for k, v in sorted(manifest.files.items()) if not k.startswith(ENGINES_DIR + "/")}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def cache_key(content: str, graph: str, device: Device, precision: str, profiles: list[dict]) -> str:
    """The folder name engines/<key>/: one per (graphs, GPU, TensorRT, precision, profiles)."""
    blob = json.dumps({"content": content, "graph": graph, "tensorrt": _trt_release(device.tensorrt),
                       "cc": device.compute_capability, "gpu": device.gpu, "precision": precision,
                       "profiles": profiles}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _trt_release(version: str) -> str:
    """major.minor.patch: plans are tied to a TensorRT release (the build number is packaging)."""
    return ".".join(str(version).split(".")[:3])


def why_not(entry: dict, device: Device, content: str) -> str | None:
    """None if the engine fits; otherwise the reason it must not be loaded."""
    if entry.get("bundle_content") != content:
        return "stale: built from other graphs or embeddings than this bundle holds"
    if _trt_release(entry.get("tensorrt", "")) != _trt_release(device.tensorrt):
        return f"built with TensorRT {entry.get('tensorrt')}, this machine has {device.tensorrt}"
    if str(entry.get("compute_capability")) != device.compute_capability:
        return (f"built for compute capability {entry.get('compute_capability')} ({entry.get('gpu')}), this GPU is "
                f"{device.compute_capability} ({device.gpu})")
    return None


def select_engines(manifest: Manifest, device: Device, graphs: tuple[str, ...], bundle_path="BUNDLE") -> dict[str, dict]:
    """graph name -> the engine entry to load, for each of ``graphs``; an exact GPU-name match is
    preferred among engines of the same compute capability."""
    content = content_hash(manifest)
    fix = (f"build engines for this device with `molmoact-edge build --bundle {bundle_path}` (TensorRT "
           f"{device.tensorrt}, {device.gpu}, compute capability {device.compute_capability})")
    chosen, refused = {}, []
    for g in graphs:
        fits = []
        for e in manifest.engines:
            if e.get("graph") != g:
                continue
            reason = why_not(e, device, content)
            if reason is None:
                fits.append(e)
            else:
                refused.append(f"{e.get('file')}: {reason}")
        if fits:
            chosen[g] = sorted(fits, key=lambda e: e.get("gpu") != device.gpu)[0]
    missing = [g for g in graphs if g not in chosen]
    if missing:
        detail = "; ".join(refused) if refused else "the bundle holds no engines for them"
        raise EngineError(f"no TensorRT engine in {bundle_path} fits this device for {missing} ({detail}); {fix}")
    return chosen
