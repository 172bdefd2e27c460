"""GPU backends: what can be checked here (provider selection, the clear errors on a CPU-only
machine) and what needs a CUDA GPU or TensorRT (skipped with the reason where they are absent)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import GoldenCase, run_generate_json

from molmoact_edge.runtime.engine.deps import BackendUnavailable
from molmoact_edge.runtime.engine.ort_backend import resolve_providers


def _cuda_device_count() -> int:
    try:
        from molmoact_edge.runtime.engine.cuda_mem import runtime

        rt = runtime()
        err, n = rt.cudaGetDeviceCount()
        return n if err == rt.cudaError_t.cudaSuccess else 0
    except ImportError:
        return 0


NO_CUDA = "needs a CUDA GPU reachable through cuda-python (pip install cuda-python matching the driver's CUDA)"
needs_cuda = pytest.mark.skipif(_cuda_device_count() == 0, reason=NO_CUDA)
needs_trt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                               reason="needs TensorRT: pip install 'molmoact-edge[tensorrt]' (JetPack ships it)")


def test_provider_names():
    cpu_only = ["CPUExecutionProvider"]
    assert resolve_providers("cpu", cpu_only) == cpu_only
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("cuda", gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("tensorrt", gpu)[0] == "TensorrtExecutionProvider"
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        resolve_providers("cuda", cpu_only)
    with pytest.raises(ValueError, match="accepted"):
        resolve_providers("rocm", gpu)


def test_cuda_providers_on_cpu_onnxruntime_name_onnxruntime_gpu(bundle_a):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    from molmoact_edge.runtime.engine.bundle import load_manifest
    from molmoact_edge.runtime.engine.config import ModelConfig
    from molmoact_edge.runtime.engine.ort_backend import OrtBackend

    with pytest.raises(BackendUnavailable, match="pip install onnxruntime-gpu"):
        OrtBackend(load_manifest(bundle_a), ModelConfig.load(bundle_a), providers="cuda")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_backend_without_tensorrt_names_the_extra(bundle_a, fixture_a):
    case = GoldenCase(fixture_a, "single_256")
    cmd = [sys.executable, "-m", "molmoact_edge", "generate", "--bundle", str(bundle_a), "--backend", "tensorrt",
           "--instruction", case.instruction, "--json", "--max-new-tokens", "2"]
    for p in case.image_paths:
        cmd += ["--image", str(p)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "molmoact-edge[tensorrt]" in out.stderr, out.stderr


def test_providers_flag_is_for_onnxruntime_only(fixture_a):
    out = subprocess.run([sys.executable, "-m", "molmoact_edge", "generate", "--checkpoint", str(fixture_a / "checkpoint"),
                          "--providers", "cuda", "--image", "x.png", "--instruction", "pick"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--providers" in out.stderr


# --- on a CUDA GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_cuda_buffers_gather_and_graph_replay():
    """The runtime's CUDA layer alone (no TensorRT): copies, the device-side row gather, and a captured
    graph that replays its copies after the host rewrote the source buffer."""
    from molmoact_edge.runtime.engine.cuda_mem import CapturedGraph, DeviceBuffer, Stream

    s = Stream()
    table = np.arange(40, dtype=np.float16).reshape(10, 4)
    dev, out = DeviceBuffer(table.nbytes), DeviceBuffer(3 * 8)
    s.h2d(dev.ptr, table)
    s.gather_rows(out.ptr, dev.ptr, 8, np.array([7, 0, 7]))
    got = np.empty((3, 4), np.float16)
    s.d2h(got, out.ptr)
    s.sync()
    assert (got == table[[7, 0, 7]]).all()
    src, dst = DeviceBuffer(16), DeviceBuffer(16)
    graph = CapturedGraph(s, lambda st: st.d2d(dst.ptr, src.ptr, 16))
    for v in (1.0, 2.0):
        host = np.full(4, v, np.float32)
        s.h2d(src.ptr, host)
        graph.launch(s)
        back = np.empty(4, np.float32)
        s.d2h(back, dst.ptr)
        s.sync()
        assert (back == v).all()
    graph.destroy()
    for b in (dev, out, src, dst):
        b.free()
    s.destroy()


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_cuda
@needs_trt
def test_tensorrt_engines_reproduce_official_ids(fixture_a, tmp_path):
    """End to end on a TensorRT machine: export --static-kv, build, generate --backend tensorrt."""
    from molmoact_edge.export.onnx_export import export_bundle

    bundle = export_bundle(fixture_a / "checkpoint", tmp_path / "b", progress=lambda s: None, static_kv=True)
    built = subprocess.run([sys.executable, "-m", "molmoact_edge", "build", "--bundle", str(bundle), "--max-seq-len", "1024"],
                           capture_output=True, text=True, timeout=3600)
    assert built.returncode == 0, built.stderr
    assert json.loads((bundle / "manifest.json").read_text())["engines"]
    case = GoldenCase(fixture_a, "single_256")
    n = len(case["generated_ids"])
    out = run_generate_json(case, ["--bundle", str(bundle), "--backend", "tensorrt"], ["--max-new-tokens", str(n), "--no-grammar"])
    assert out["token_ids"] == case["generated_ids"].tolist()
