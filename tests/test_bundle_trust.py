"""A bundle is only what its folder holds, every file it uses is hashed, its manifest tells the truth,
and a deployment can pin it (issue 10 item 1, issue 11 items 4 and 6).

Each test damages a copy of a freshly exported bundle of golden fixture A the way a bad copy, a
hand edit or a hostile manifest would, and checks that loading refuses it with a message naming the
problem. The bundle is exported with the torch side; the checks themselves run torch-free.
"""

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest

from molmoact_edge.runtime.engine.bundle import BundleError, load_manifest
from molmoact_edge.runtime.engine.pipeline import open_bundle

pytest.importorskip("torch", reason="exporting the test bundle needs the torch side: pip install 'molmoact-edge[export]'")


@pytest.fixture(scope="module")
def clean_bundle(checkpoint_a, tmp_path_factory):
    from molmoact_edge.export.onnx_export import export_bundle

    return export_bundle(checkpoint_a, tmp_path_factory.mktemp("trust") / "bundle", progress=lambda s: None)


@pytest.fixture
def bundle(clean_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(clean_bundle, dst, symlinks=True)
    return dst


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit(bundle, fn) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    fn(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def _logits(pipe, ids):
    b = pipe.backend
    b.reset(len(ids))
    return b.forward(np.asarray(ids), 0)


def test_exporter_writes_through_the_schema(clean_bundle):
    from molmoact_edge.runtime.engine.manifest import Manifest

    raw = json.loads((clean_bundle / "manifest.json").read_text())
    assert Manifest.from_json(raw).to_json() == raw
    on_disk = {p.relative_to(clean_bundle).as_posix() for p in clean_bundle.rglob("*") if p.is_file()}
    assert set(raw["files"]) == on_disk - {"manifest.json"}
    assert all(raw["files"][name] == _sha(clean_bundle / name) for name in raw["files"])


# ---- a bundle is only what its folder holds ---------------------------------------------------


def test_absolute_path_is_refused_without_reading_it(bundle):
    # Before the fix the hash check read /dev/zero forever.
    _edit(bundle, lambda m: m["files"].update({"/dev/zero": "0" * 64}))
    with pytest.raises(BundleError, match="'/dev/zero' is an absolute path"):
        load_manifest(bundle)


@pytest.mark.parametrize("where", ["files", "graph", "embeddings"])
def test_dotdot_path_is_refused(bundle, where):
    outside = bundle.parent / "outside"
    outside.mkdir()
    shutil.copyfile(bundle / "llm.onnx", outside / "llm.onnx")
    shutil.copyfile(bundle / "embeddings.npy", outside / "embeddings.npy")
    (outside / "passwd").write_text("root:x:0:0")

    def edit(m):
        if where == "files":
            m["files"]["../outside/passwd"] = _sha(outside / "passwd")
        elif where == "graph":
            m["graphs"]["llm"]["file"] = "../outside/llm.onnx"
            m["files"]["../outside/llm.onnx"] = _sha(outside / "llm.onnx")
        else:
            m["embeddings"]["file"] = "../outside/embeddings.npy"
            m["files"]["../outside/embeddings.npy"] = _sha(outside / "embeddings.npy")

    _edit(bundle, edit)
    with pytest.raises(BundleError, match=r"leads out of the bundle \('\.\.'\)"):
        open_bundle(bundle)


def test_symlink_leading_out_is_refused(bundle):
    outside = bundle.parent / "tokenizer.json"
    (bundle / "tokenizer.json").rename(outside)
    (bundle / "tokenizer.json").symlink_to(outside)  # same content, same hash: only the location is wrong
    with pytest.raises(BundleError, match="tokenizer.json is a link to .* outside the bundle"):
        open_bundle(bundle)


def test_symlink_inside_the_bundle_is_accepted(bundle):
    (bundle / "copies").mkdir()
    (bundle / "tokenizer.json").rename(bundle / "copies" / "tokenizer.json")
    (bundle / "tokenizer.json").symlink_to("copies/tokenizer.json")
    _edit(bundle, lambda m: m["files"].update({"copies/tokenizer.json": m["files"]["tokenizer.json"]}))
    load_manifest(bundle)


def test_fifo_is_refused_without_blocking(bundle):
    os.mkfifo(bundle / "pipe")
    _edit(bundle, lambda m: m["files"].update({"pipe": "0" * 64}))
    with pytest.raises(BundleError, match="pipe is not a regular file"):
        load_manifest(bundle)


@pytest.mark.parametrize("name", ["embeddings.npy", "config.json", "tokenizer.json", "preprocessor_config.json"])
def test_every_file_that_is_read_must_be_hashed(bundle, name):
    _edit(bundle, lambda m: m["files"].pop(name))
    with pytest.raises(BundleError, match=f"{name} .*(has no sha256|not in its manifest)"):
        open_bundle(bundle)


def test_unlisted_file_in_the_folder_is_refused(bundle):
    (bundle / "extra.onnx").write_bytes(b"not listed")
    with pytest.raises(BundleError, match=r"\['extra.onnx'\] is in the bundle folder but not in its manifest"):
        load_manifest(bundle)


def test_embeddings_changed_after_loading_do_not_change_the_running_model(bundle):
    ids = [151643, 785, 3383, 374, 3265, 279, 3745]
    with open_bundle(bundle) as pipe:
        before = _logits(pipe, ids)
        # Overwrite the table in place (same inode), as a concurrent writer or a bad sync would.
        size = (bundle / "embeddings.npy").stat().st_size
        with open(bundle / "embeddings.npy", "r+b") as f:
            f.seek(size // 2)
            f.write(b"\x00" * (size - size // 2))
        after = _logits(pipe, ids)
    np.testing.assert_array_equal(before, after)


def test_unverified_bundle_maps_the_table_instead(bundle):
    from molmoact_edge.runtime.engine.bundle import load_embeddings

    table = load_embeddings(load_manifest(bundle, verify_hashes=False))
    assert isinstance(table, np.memmap)


# ---- ONNX external data ---------------------------------------------------------------------


def _externalize(bundle, location: str = "llm.onnx.data", target=None):
    """Rewrite llm.onnx with its weights in an external data file at ``target``, named ``location``
    in the graph (as a 7B export is: protobuf cannot hold more than 2 GiB)."""
    onnx = pytest.importorskip("onnx")
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load(str(bundle / "llm.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="llm.onnx.data")
    onnx.save(model, str(bundle / "llm.onnx"))  # writes the data file and strips it from the proto
    if location != "llm.onnx.data":
        target.parent.mkdir(exist_ok=True)
        shutil.move(bundle / "llm.onnx.data", target)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        (bundle / "llm.onnx").write_bytes(model.SerializeToString())


def test_graph_with_external_data_loads_when_hashed(bundle, clean_bundle):
    _externalize(bundle)
    _edit(bundle, lambda m: m["files"].update({"llm.onnx": _sha(bundle / "llm.onnx"),
                                               "llm.onnx.data": _sha(bundle / "llm.onnx.data")}))
    ids = [151643, 785, 3383]
    with open_bundle(bundle) as a, open_bundle(clean_bundle) as b:
        np.testing.assert_array_equal(_logits(a, ids), _logits(b, ids))
    with open(bundle / "llm.onnx.data", "r+b") as f:
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(BundleError, match="llm.onnx.data does not match its sha256"):
        load_manifest(bundle)


def test_unhashed_external_data_is_refused(bundle):
    _externalize(bundle, "weights/llm.bin", bundle / "weights" / "llm.bin")
    # The graph is hashed, the data file it reads is not.
    _edit(bundle, lambda m: m["files"].update({"llm.onnx": _sha(bundle / "llm.onnx")}))
    with pytest.raises(BundleError, match="weights/llm.bin"):
        load_manifest(bundle)


def test_external_data_outside_the_bundle_is_refused(bundle):
    # onnxruntime 1.32 refuses this itself; the project allows older versions, so the loader checks.
    _externalize(bundle, "../llm.onnx.data", bundle.parent / "llm.onnx.data")
    _edit(bundle, lambda m: m["files"].update({"llm.onnx": _sha(bundle / "llm.onnx")}))
    with pytest.raises(BundleError, match=r"llm.onnx: external data location = '\.\./llm.onnx.data' leads out"):
        load_manifest(bundle)


# ---- a manifest that lies is refused (issue 11 item 6; kv_cache.dtype: item 4) ----------------

LIES = {
    "model.hidden_size": lambda m: m["model"].update(hidden_size=64),
    "model.layers": lambda m: m["model"].update(layers=3),
    "model.kv_heads": lambda m: m["model"].update(kv_heads=4),
    "model.vocab_size": lambda m: m["model"].update(vocab_size=152000),
    "model.image_patch_id": lambda m: m["model"].update(image_patch_id=152067),
    "model.max_position_embeddings": lambda m: m["model"].update(max_position_embeddings=64),
    "dtype": lambda m: m.update(dtype="fp16"),
    "opset": lambda m: m.update(opset=17),
    "kv_cache.dtype": lambda m: m["kv_cache"].update(dtype="float16"),
    "embeddings.dtype": lambda m: m["embeddings"].update(dtype="float16"),
}


@pytest.mark.parametrize("field", sorted(LIES))
def test_manifest_that_lies_is_refused(bundle, field):
    _edit(bundle, LIES[field])
    with pytest.raises(BundleError, match=rf"{re.escape(field)}.* = .* but "):
        open_bundle(bundle)


def test_kv_dtype_lie_is_one_error_line_from_generate(bundle, fixture_a):
    import subprocess
    import sys

    _edit(bundle, LIES["kv_cache.dtype"])
    proc = subprocess.run([sys.executable, "-m", "molmoact_edge", "generate", "--bundle", str(bundle), "--image",
                           str(fixture_a / "cases" / "img_256_a.png"), "--instruction", "close the box",
                           "--max-new-tokens", "2", "--no-grammar"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "kv_cache.dtype = 'float16'" in proc.stderr and proc.stderr.startswith("error: ")


# ---- pinning the manifest's own hash ---------------------------------------------------------


def test_pinned_manifest_hash(bundle):
    pin = _sha(bundle / "manifest.json")
    assert load_manifest(bundle, bundle_sha256=pin.upper()).manifest_sha256 == pin
    with pytest.raises(BundleError, match="not the pinned"):
        load_manifest(bundle, bundle_sha256="0" * 64)
    with pytest.raises(BundleError, match="64 hex digits"):
        load_manifest(bundle, bundle_sha256="abc")
    # A deliberate edit with recomputed hashes passes the hash check but not the pin.
    (bundle / "norm_stats.json").write_text("{}")
    _edit(bundle, lambda m: m["files"].update({"norm_stats.json": _sha(bundle / "norm_stats.json")}))
    load_manifest(bundle)
    with pytest.raises(BundleError, match="not the pinned"):
        load_manifest(bundle, bundle_sha256=pin)


def test_generate_and_run_take_the_pin(bundle, fixture_a, capsys):
    from molmoact_edge.main import main

    image = str(fixture_a / "cases" / "img_256_a.png")
    pin = _sha(bundle / "manifest.json")
    base = ["generate", "--bundle", str(bundle), "--image", image, "--instruction", "close the box",
            "--max-new-tokens", "2", "--no-grammar", "--json"]
    assert main(base + ["--bundle-sha256", pin]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 2
    assert main(base + ["--bundle-sha256", "f" * 64]) != 0
    assert "not the pinned" in capsys.readouterr().err
    # run checks the pin before it touches a camera or the arm.
    code = main(["run", "--policy", "molmoact", "--bundle", str(bundle), "--bundle-sha256", "f" * 64,
                 "--camera", "replay:/nonexistent", "--robot", "sim", "--instruction", "close the box"])
    assert code != 0
    assert "not the pinned" in capsys.readouterr().err


# ---- the checkpoint loader's shard names ----------------------------------------------------


@pytest.mark.parametrize("shard", ["../outside/model.safetensors", "/tmp/model.safetensors", "sub/model.safetensors"])
def test_checkpoint_shard_names_stay_in_the_folder(checkpoint_a, tmp_path, shard):
    from molmoact_edge.export.checkpoint import CheckpointError, WeightFiles

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "model.safetensors").symlink_to(checkpoint_a / "model.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    with pytest.raises(CheckpointError, match="a shard must be a \\*.safetensors file name in the checkpoint folder"):
        WeightFiles.find(ckpt)


def test_checkpoint_shard_must_be_a_regular_file(tmp_path):
    from molmoact_edge.export.checkpoint import CheckpointError, WeightFiles

    (tmp_path / "model-00001-of-00001.safetensors").symlink_to("/dev/zero")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="is not a regular file"):
        WeightFiles.find(tmp_path)
