"""`molmoact-edge quantize` end to end on a checkpoint of other widths and depths than fixture A,
and `molmoact-edge generate --bundle` running the result on onnxruntime CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the torch side: pip install '.[export]' (absent on a robot install)")
from test_quant_artifacts import OTHER

from molmoact_edge.export.tiny import write_checkpoint

CLI = [sys.executable, "-m", "molmoact_edge"]


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("other") / "checkpoint", OTHER, seed=11)


@pytest.mark.parametrize("scheme", ["int4-rtn", "fp16", "w8a8-sq", "int4-awq"])
def test_quantize_then_generate(other_checkpoint, fixture_a, tmp_path, scheme):
    out = tmp_path / scheme
    proc = subprocess.run([*CLI, "quantize", "--checkpoint", str(other_checkpoint), "--scheme", scheme,
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    steps = {"w8a8-sq": 6, "int4-awq": 6}.get(scheme, 4)
    assert f"[{steps}/{steps}] writing" in proc.stderr  # progress lines
    if scheme == "int4-awq":
        assert "AWQ 1/" in proc.stderr and "x RTN's" in proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["quantization"]["scheme"] == scheme
    assert m["model"]["layers"] == OTHER.llm_layers and m["model"]["hidden_size"] == OTHER.llm_hidden
    gen = subprocess.run([*CLI, "generate", "--bundle", str(out), "--image", str(fixture_a / "cases" / "img_256_a.png"),
                          "--instruction", "put the red block in the bowl", "--max-new-tokens", "5", "--no-grammar",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert len(json.loads(gen.stdout)["token_ids"]) == 5


@pytest.mark.parametrize("args,message", [
    (["--scheme", "int4-rtn", "--group-size", "100"], "power of two >= 16"),
    (["--scheme", "int8-wo", "--group-size", "64"], "per output channel"),
    (["--scheme", "w8a8-sq", "--group-size", "128"], "drop --group-size"),
    (["--scheme", "fp8", "--group-size", "128"], "drop --group-size"),
    (["--scheme", "int4-awq", "--group-size", "24"], "power of two >= 16"),
])
def test_quantize_refuses_bad_options_with_one_error_line(tmp_path, args, message):
    proc = subprocess.run([*CLI, "quantize", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "b"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr and "Traceback" not in proc.stderr


def test_quantize_static_kv_gives_a_bundle_build_can_check(other_checkpoint, tmp_path):
    """--static-kv: the static-cache graph GPU engines build from is written and quantised too, and
    `build --check-only` passes on it (the TensorRT 10.3 operator table, no TensorRT needed)."""
    out = tmp_path / "b"
    proc = subprocess.run([*CLI, "quantize", "--checkpoint", str(other_checkpoint), "--scheme", "int4-rtn",
                           "--target", "tensorrt", "--static-kv", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "llm.onnx and llm_static.onnx" in proc.stderr
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["quantized_graphs"] == ["llm", "llm_static"] and q["graph_opsets"]["llm_static"] == 21
    check = subprocess.run([*CLI, "build", "--bundle", str(out), "--check-only"], capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "llm_static.onnx" in check.stdout and "no llm_static graph" not in check.stdout


def test_quantize_static_kv_refuses_the_w8a8_onnxruntime_form(tmp_path):
    proc = subprocess.run([*CLI, "quantize", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "b"),
                           "--scheme", "w8a8-sq", "--static-kv"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "--target tensorrt" in proc.stderr and "Traceback" not in proc.stderr
