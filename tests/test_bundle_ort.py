"""Exported bundles on onnxruntime: same ids as the official implementation, same logits as the
reference, one graph for prefill/decode/verify, and damaged bundles refused with a clear error.

The bundle tests also run on the robot install (no torch, bundles handed over by conftest's
MOLMOACT_TEST_BUNDLES); the tests that need the reference or the exporter skip there."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import GoldenCase, case_id, golden_cases, run_generate_json

from molmoact_edge.runtime.engine.bundle import BundleError, load_manifest
from molmoact_edge.runtime.engine.pipeline import open_bundle
from molmoact_edge.runtime.engine.config import ModelConfig
from molmoact_edge.runtime.engine.ort_backend import OrtBackend

CASES = golden_cases()
NO_TORCH = "torch not installed (a robot install): the reference and the exporter need pip install '.[export]'"


def export_bundle(*args, **kwargs):
    """The exporter where torch is installed; a skip on the robot install."""
    pytest.importorskip("torch", reason=NO_TORCH)
    from molmoact_edge.export.onnx_export import export_bundle

    return export_bundle(*args, **kwargs)


@pytest.mark.parametrize("item", CASES, ids=[case_id(c) for c in CASES])
def test_generate_bundle_onnxruntime_greedy_ids(item, bundles):
    fixture, name = item
    case = GoldenCase(fixture, name)
    n = len(case["generated_ids"])
    out = run_generate_json(case, ["--bundle", str(bundles[fixture]), "--backend", "onnxruntime"],
                            ["--max-new-tokens", str(n), "--no-grammar"])
    assert out["token_ids"] == case["generated_ids"].tolist()
    assert out["prompt_tokens"] == case["input_ids"].shape[1]


@pytest.fixture(scope="module")
def ort_a(bundle_a):
    return OrtBackend(load_manifest(bundle_a), ModelConfig.load(bundle_a))


@pytest.fixture(scope="module")
def backends(ort_a, checkpoint_a):
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    from molmoact_edge.export.checkpoint import load_model
    from molmoact_edge.export.torch_backend import TorchBackend

    return ort_a, TorchBackend(load_model(checkpoint_a, torch.float32))


@pytest.mark.parametrize("name", ["single_256", "multi_2x256"])
def test_logits_match_reference_and_golden(backends, fixture_a, name):
    ort_b, ref = backends
    case = GoldenCase(fixture_a, name)
    crops, idx, ids = case["images"][0], case["pooled_patches_idx"][0], case["input_ids"][0]
    feats = ort_b.vision(crops, idx)
    assert np.abs(feats - case["image_features"]).max() < 1e-4
    for b in (ort_b, ref):
        b.reset(len(ids) + 8)
    rows = np.asarray(case["earlier_positions"].tolist() + [len(ids) - 1])
    lo = ort_b.forward(ids, 0, feats, rows)
    lr = ref.forward(ids, 0, ref.vision(crops, idx), rows)
    assert np.abs(lo[-1] - case["logits_last"]).max() < 1e-4
    assert np.abs(lo - lr).max() < 1e-4
    # Decode steps keep agreeing with the reference.
    for step, tok in enumerate(case["generated_ids"][:4]):
        lo = ort_b.forward(np.array([tok]), len(ids) + step)
        lr = ref.forward(np.array([tok]), len(ids) + step)
        assert np.abs(lo - lr).max() < 1e-4


def test_k_token_forward_equals_k_single_forwards(ort_a, fixture_a):
    ort_b = ort_a
    case = GoldenCase(fixture_a, "single_256")
    ids = case["input_ids"][0]
    feats = ort_b.vision(case["images"][0], case["pooled_patches_idx"][0])
    span = np.array([785, 7990, 2415, 315, 279, 1156, 2168], dtype=np.int64)
    S = len(ids)

    ort_b.reset(S + 16)
    ort_b.forward(ids, 0, feats)
    together = ort_b.forward(span, S, logits_rows=np.arange(len(span)))
    kv_together = ort_b.kv[S:S + len(span)].copy()

    ort_b.reset(S + 16)
    ort_b.forward(ids, 0, feats)
    single = np.concatenate([ort_b.forward(span[i:i + 1], S + i) for i in range(len(span))])
    assert together.shape == single.shape == (len(span), 152064)
    assert np.abs(together - single).max() < 1e-4
    assert np.abs(kv_together - ort_b.kv[S:S + len(span)]).max() < 1e-5
    assert np.abs(kv_together).max() > 0  # the graph really wrote into the preallocated cache


def test_runtime_path_imports_no_torch(bundle_a, fixture_a):
    case = GoldenCase(fixture_a, "single_256")
    code = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from molmoact_edge.main import main\n"
        f"main(['generate', '--bundle', {str(bundle_a)!r}, '--image', {str(case.image_paths[0])!r},"
        f" '--instruction', {case.instruction!r}, '--max-new-tokens', '3', '--no-grammar', '--json'])\n"
        "assert not any(k == 'torch' or k.startswith('torch.') for k in sys.modules if sys.modules[k] is not None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["token_ids"] == case["generated_ids"][:3].tolist()


@pytest.fixture
def damaged(bundle_a, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_a, dst)
    return dst


def _rewrite_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_missing_file_is_refused(damaged):
    (damaged / "llm.onnx").unlink()
    with pytest.raises(BundleError, match="file llm.onnx listed in the manifest is missing"):
        open_bundle(damaged)


def test_changed_file_is_refused(damaged):
    with open(damaged / "embeddings.npy", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(BundleError, match="embeddings.npy does not match its sha256"):
        open_bundle(damaged)


def test_wrong_format_version_is_refused(damaged):
    _rewrite_manifest(damaged, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="bundle format version 99, but this molmoact-edge reads version 1; re-export"):
        open_bundle(damaged)


def test_wrong_graph_signature_is_refused(damaged):
    # A graph swapped in with a consistent hash: only the signature check can catch it.
    shutil.copyfile(damaged / "vision.onnx", damaged / "llm.onnx")
    from molmoact_edge.runtime.engine.bundle import sha256_file

    _rewrite_manifest(damaged, lambda m: m["files"].update({"llm.onnx": sha256_file(damaged / "llm.onnx")}))
    with pytest.raises(BundleError, match="graph 'llm' inputs are .*crops.*but the manifest says"):
        open_bundle(damaged)


def test_manifest_config_mismatch_is_refused(damaged):
    _rewrite_manifest(damaged, lambda m: m["kv_cache"].update(shape=["positions", 3, 2, 2, 8]))
    with pytest.raises(BundleError, match="manifest KV shape"):
        open_bundle(damaged)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        open_bundle(tmp_path)


def test_export_refuses_to_overwrite(bundle_a, checkpoint_a):
    with pytest.raises(FileExistsError, match="--force"):
        export_bundle(checkpoint_a, bundle_a, progress=lambda s: None)


def test_fp16_bundle_runs_and_stays_close(checkpoint_a, fixture_a, tmp_path):
    """fp16 graphs are what GPU engines consume; on CPU they must load, keep the KV in fp16, and stay
    within fp16 rounding of the fp32 golden logits."""
    bundle = export_bundle(checkpoint_a, tmp_path / "fp16", dtype="fp16", progress=lambda s: None)
    manifest = load_manifest(bundle)
    assert manifest.manifest.dtype == "fp16" and manifest.manifest.kv_cache.dtype == "float16"
    backend = OrtBackend(manifest, ModelConfig.load(bundle))
    case = GoldenCase(fixture_a, "single_256")
    ids = case["input_ids"][0]
    backend.reset(len(ids) + 1)
    logits = backend.forward(ids, 0, backend.vision(case["images"][0], case["pooled_patches_idx"][0]))[-1]
    assert backend.kv.dtype == np.float16
    assert np.abs(logits - case["logits_last"]).max() < 5e-2
    assert int(logits.argmax()) == int(case["logits_last"].argmax())


def test_other_shapes_bundle_matches_reference(tmp_path):
    """Nothing is tuned to fixture A's sizes: another width/depth/head layout exports and runs the
    same on both engines."""
    pytest.importorskip("torch", reason=NO_TORCH)
    from PIL import Image

    from molmoact_edge.export.checkpoint import load_model
    from molmoact_edge.export.tiny import TinySize, write_checkpoint
    from molmoact_edge.export.torch_backend import TorchBackend
    from molmoact_edge.runtime.engine.pipeline import ModelSpec, Pipeline

    size = TinySize(vit_hidden=48, vit_heads=3, vit_mlp=80, vit_layers=12, adapter_heads=4, projector_hidden=40,
                    llm_hidden=48, llm_heads=6, llm_kv_heads=3, llm_mlp=72, llm_layers=3)
    ckpt = write_checkpoint(tmp_path / "ckpt", size, seed=11)
    bundle = export_bundle(ckpt, tmp_path / "bundle", progress=lambda s: None)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    spec = ModelSpec.load(ckpt)
    with Pipeline(spec, TorchBackend(load_model(ckpt))) as ref, open_bundle(bundle) as ort_pipe:
        a = ref.step([image, image], "stack the cups", max_new_tokens=12)
        b = ort_pipe.step([image, image], "stack the cups", max_new_tokens=12)
    assert a.result.token_ids == b.result.token_ids
    assert a.result.prompt_tokens == b.result.prompt_tokens > 1000
