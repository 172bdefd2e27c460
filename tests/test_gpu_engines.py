"""TensorRT engines in a bundle, the parts that are plain logic (no TensorRT, no GPU): profiles by
token count, engine entries hashed into the manifest, and the choice of engine for a device with a
stale or foreign engine refused, never loaded."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from molmoact_edge.runtime.engine.bundle import BundleError, load_manifest
from molmoact_edge.runtime.engine.manifest import TensorSpec
from molmoact_edge.runtime.engine.trt_build import add_engines
from molmoact_edge.runtime.engine.trt_engines import (
    ENGINES_DIR,
    Device,
    EngineError,
    cache_key,
    content_hash,
    select_engines,
)
from molmoact_edge.runtime.engine.trt_profiles import llm_profiles, profile_for

ORIN = Device("10.3.0.30", "Orin", "8.7")
GRAPHS = ("vision", "llm_static")


def test_profiles_by_token_count():
    profiles = llm_profiles(max_seq_len=1024, max_verify=8)
    assert [profiles[profile_for(profiles, q)].name for q in (1, 2, 8, 9, 220, 1024)] == \
        ["decode", "verify", "verify", "prefill", "prefill", "prefill"]
    with pytest.raises(ValueError, match="larger --max-seq-len"):
        profile_for(profiles, 1025)
    with pytest.raises(ValueError, match="max-verify"):
        llm_profiles(8, 8)


def test_decode_profile_is_one_static_shape_per_input():
    """Every input of the static-cache graph has min = opt = max in the decode profile: the shape a
    CUDA graph is captured for (the names are the exported graph's, as the manifest lists them)."""
    inputs = (TensorSpec("inputs_embeds", "float32", (1, "q", 32)), TensorSpec("position_ids", "int64", ("q",)),
              TensorSpec("kv_cache", "float32", ("max_seq_len", 2, 2, 2, 8)), TensorSpec("logits_index", "int64", ("rows",)))
    decode, verify, prefill = llm_profiles(512, 4)
    shapes = decode.shapes(inputs)
    assert all(lo == opt == hi for lo, opt, hi in shapes.values())
    assert shapes["kv_cache"][0] == (512, 2, 2, 2, 8) and shapes["inputs_embeds"][0] == (1, 1, 32)
    assert prefill.shapes(inputs)["inputs_embeds"] == ((1, 5, 32), (1, 256, 32), (1, 512, 32))
    with pytest.raises(ValueError, match="does not set"):
        decode.shapes((TensorSpec("past_kv", "float32", ("past", 2)),))


def _fake_engines(bundle, device=ORIN, graphs=GRAPHS, tag="a"):
    """Engine entries as build_engines writes them, with stand-in plan bytes."""
    m = load_manifest(bundle).manifest
    content = content_hash(m)
    entries = []
    for g in graphs:
        key = cache_key(content, g, device, "fp16", [{"tag": tag}])
        folder = bundle / ENGINES_DIR / key
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{g}.plan").write_bytes(f"plan of {g} for {device}".encode())
        (folder / "engine.json").write_text("{}")
        entries.append({"file": f"{ENGINES_DIR}/{key}/{g}.plan", "manifest": f"{ENGINES_DIR}/{key}/engine.json",
                        "graph": g, "key": key, "tensorrt": device.tensorrt, "gpu": device.gpu,
                        "compute_capability": device.compute_capability, "bundle_content": content,
                        "precision": "fp16"})
    return add_engines(bundle, m, entries)


@pytest.fixture
def with_engines(bundle_a, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundle_a, b)
    _fake_engines(b)
    return b


def test_engines_are_hashed_bundle_files_and_selected(with_engines):
    bundle = load_manifest(with_engines)  # the loader's own checks: every engine file listed and hashed
    assert len(bundle.manifest.engines) == 2
    chosen = select_engines(bundle.manifest, ORIN, GRAPHS)
    assert {g: e["graph"] for g, e in chosen.items()} == {g: g for g in GRAPHS}
    plan = with_engines / chosen["llm_static"]["file"]
    plan.write_bytes(b"tampered")
    with pytest.raises(BundleError, match="does not match its sha256"):
        load_manifest(with_engines)


@pytest.mark.parametrize("device, reason", [
    (Device("10.7.0.23", "Orin", "8.7"), "built with TensorRT 10.3.0.30, this machine has 10.7.0.23"),
    (Device("10.3.0.30", "NVIDIA H200", "9.0"), "built for compute capability 8.7 (Orin), this GPU is 9.0"),
])
def test_foreign_engine_is_refused(with_engines, device, reason):
    with pytest.raises(EngineError) as e:
        select_engines(load_manifest(with_engines).manifest, device, GRAPHS, with_engines)
    assert reason in str(e.value) and f"molmoact-edge build --bundle {with_engines}" in str(e.value)


def test_same_release_other_build_number_and_gpu_name_preference(with_engines):
    m = load_manifest(with_engines).manifest
    assert select_engines(m, Device("10.3.0.26", "Orin", "8.7"), GRAPHS)  # same release, other packaging build
    _fake_engines(with_engines, Device("10.3.0.30", "Orin (nvgpu)", "8.7"), tag="b")
    m = load_manifest(with_engines).manifest
    assert select_engines(m, Device("10.3.0.30", "Orin (nvgpu)", "8.7"), GRAPHS)["vision"]["gpu"] == "Orin (nvgpu)"
    assert select_engines(m, ORIN, GRAPHS)["vision"]["gpu"] == "Orin"


def test_stale_engine_is_refused(with_engines):
    """Engines built before the graphs changed (re-export into the same folder, entries carried over)."""
    m = load_manifest(with_engines).manifest
    files = {**m.files, "llm_static.onnx": "0" * 64} if "llm_static.onnx" in m.files else {**m.files, "llm.onnx": "0" * 64}
    with pytest.raises(EngineError, match="stale: built from other graphs"):
        select_engines(dataclasses.replace(m, files=files), ORIN, GRAPHS)


def test_no_engines_says_how_to_build(bundle_a):
    with pytest.raises(EngineError, match="holds no engines"):
        select_engines(load_manifest(bundle_a).manifest, ORIN, GRAPHS, bundle_a)
