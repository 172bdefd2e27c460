"""Calibration sets: the shipped default set (its provenance reproduced, its files hashed, shipped in
the wheel), the builders from image folders and `record` outputs, and damaged sets refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from molmoact_edge.quantization import calib_builders
from molmoact_edge.quantization.calibration import (
    CalibrationError,
    default_set_path,
    load_calibration_set,
)
from molmoact_edge.quantization.scenes import scenes


def test_default_set_loads_with_both_splits_and_is_small():
    s = load_calibration_set()
    assert s.views == ("primary",)
    cal, ev = s.split("calibration"), s.split("evaluation")
    assert len(cal) >= 8 and len(ev) >= 2
    assert not {x.id for x in cal} & {x.id for x in ev}
    assert "Apache" in s.licence and "seed" in s.provenance
    size = sum(p.stat().st_size for p in default_set_path().rglob("*") if p.is_file())
    assert size < 4 * 2 ** 20
    img = cal[0].load_images(s.views)[0]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.std() > 10  # a scene, not a blank frame


def test_default_set_is_what_its_provenance_says():
    """The manifest says the generator made it: regenerating gives the same pixels and instructions."""
    s = load_calibration_set()
    made = scenes()
    assert len(made) == len(s.samples)
    for sample, (instruction, image) in zip(s.samples, made):
        assert sample.instruction == instruction
        assert np.array_equal(sample.load_images(s.views)[0], image)


def test_instructions_name_objects_and_vary():
    s = load_calibration_set()
    texts = [x.instruction for x in s.samples]
    assert len(set(texts)) >= len(texts) // 2
    assert all(any(c in t for c in ("red", "blue", "green", "yellow", "orange", "purple", "white", "black"))
               for t in texts)


def _copy_default(tmp_path):
    dst = tmp_path / "set"
    shutil.copytree(default_set_path(), dst)
    return dst


def test_changed_image_is_refused(tmp_path):
    d = _copy_default(tmp_path)
    img = sorted((d / "images").iterdir())[0]
    img.write_bytes(img.read_bytes()[:-8] + b"tampered")
    with pytest.raises(CalibrationError, match="sha256"):
        load_calibration_set(d)


def test_missing_split_and_escaping_paths_are_refused(tmp_path):
    d = _copy_default(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["samples"] = [x for x in m["samples"] if x["split"] == "calibration"]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CalibrationError, match="'evaluation' split is empty"):
        load_calibration_set(d)
    m["files"]["../outside.png"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CalibrationError, match="outside the set folder"):
        load_calibration_set(d)
    with pytest.raises(CalibrationError, match="manifest.json is missing"):
        load_calibration_set(tmp_path / "nothing")


def test_set_hash_changes_with_an_instruction(tmp_path):
    d = _copy_default(tmp_path)
    before = load_calibration_set(d).sha256
    m = json.loads((d / "manifest.json").read_text())
    m["samples"][0]["instruction"] = "close the drawer"
    (d / "manifest.json").write_text(json.dumps(m))
    after = load_calibration_set(d)
    assert after.sha256 != before and after.samples[0].instruction == "close the drawer"


def test_from_image_folders_two_views_and_instruction_file(tmp_path):
    from PIL import Image

    made = scenes(n=6, seed=1, size=(60, 80))
    for view in ("front", "wrist"):
        (tmp_path / view).mkdir()
        for i, (_, img) in enumerate(made):
            Image.fromarray(img if view == "front" else img[::-1]).save(tmp_path / view / f"{i:03d}.png")
    lines = tmp_path / "instructions.txt"
    lines.write_text("\n".join(t for t, _ in made) + "\n")
    out = calib_builders.from_image_folders({"front": tmp_path / "front", "wrist": tmp_path / "wrist"}, lines,
                                            tmp_path / "cal", provenance="test", licence="CC0", n_samples=4)
    s = load_calibration_set(out)
    assert s.views == ("front", "wrist") and len(s.samples) == 4
    assert len(s.split("evaluation")) == 1
    # evenly spaced picks 0, 2, 3, 5 (rounded) keep their own instruction
    assert [x.instruction for x in s.samples] == [made[i][0] for i in (0, 2, 3, 5)]
    front, wrist = s.samples[1].load_images(s.views)
    assert np.array_equal(front[::-1], wrist)
    with pytest.raises(CalibrationError, match="3 instructions for 6 samples"):
        calib_builders.from_image_folders({"front": tmp_path / "front"}, ["a", "b", "c"], tmp_path / "x",
                                          provenance="t", licence="t", n_samples=4)


def test_from_recordings_image_folder_and_db3(tmp_path):
    from control_helpers import synthetic_frames, write_folder

    frames = write_folder(tmp_path / "take", 8)
    out = calib_builders.from_recordings({"primary": tmp_path / "take"}, "pick up the block", tmp_path / "cal",
                                         provenance="recorded", licence="ours", n_samples=4)
    s = load_calibration_set(out)
    assert [x.load_images(s.views)[0].tobytes() for x in s.samples] == [frames[i][0].tobytes() for i in (0, 2, 5, 7)]

    pytest.importorskip("pyrealsense2", reason="pyrealsense2 missing: pip install molmoact-edge[robot]")
    from control_helpers import INTR

    from molmoact_edge.hardware.recording import DB3Writer

    frames = synthetic_frames(12, seed=3)
    with DB3Writer(tmp_path / "take.db3", INTR, fps=30) as w:
        for i, (c, d) in enumerate(frames):
            w.write(c, d, i / 30)
            time.sleep(1 / 30)  # the recorder stamps arrival time; unpaced frames collapse on playback
    out = calib_builders.from_recordings({"primary": tmp_path / "take.db3"}, "stack the cups", tmp_path / "cal2",
                                         provenance="recorded", licence="ours", n_samples=3)
    s = load_calibration_set(out)
    recorded = {c.tobytes() for c, _ in frames}
    # replay may skip the first frames while the pipeline starts; every picked frame is a recorded one
    assert len(s.samples) == 3 and all(x.load_images(s.views)[0].tobytes() in recorded for x in s.samples)


def test_build_ships_the_default_set(tmp_path):
    """A non-editable install finds the set: setuptools' build (what a wheel is made from) holds every
    file the manifest lists, and the installed-layout copy loads through the package resource."""
    from conftest import REPO

    proc = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py",
                           "--build-lib", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    built = tmp_path / "molmoact_edge" / "calibration_data" / "default"
    m = json.loads((default_set_path() / "manifest.json").read_text())
    assert all((built / rel).is_file() for rel in [*m["files"], "manifest.json"])
    code = ("from molmoact_edge.quantization.calibration import load_calibration_set, default_set_path;"
            "s = load_calibration_set(); print(default_set_path()); print(len(s.samples))")
    # -S: no site hooks (an editable install's finder could otherwise serve this checkout); numpy from its own dir
    numpy_dir = str(Path(np.__file__).parents[1])
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path,
                          env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{numpy_dir}"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    path, n = proc.stdout.split()
    assert path.startswith(str(tmp_path)) and int(n) == len(m["samples"])
