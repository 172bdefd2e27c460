"""Shared test helpers.

Golden data comes from ../shared/fixtures (outputs of the official MolmoAct implementation), never
from this project's own code. Set MOLMOACT_FIXTURES to point elsewhere, and MOLMOACT_TEST_BUNDLES to
a folder of bundles exported beforehand (one per fixture, named like it) where torch is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MOLMOACT_FIXTURES", REPO.parent / "shared" / "fixtures"))
FIXTURE_A = FIXTURES / "molmoact-tiny-a"
CASES = ("single_256", "single_640x480", "multi_2x256", "nested_800x600")


MISSING_FIXTURES = (f"golden fixtures missing: no molmoact-tiny-*/checkpoint/config.json under {FIXTURES} (the "
                    "official implementation's outputs, kept beside the repository in ../shared/fixtures; set "
                    "MOLMOACT_FIXTURES to their folder)")


# A test that runs the torch reference or the exporter itself; the robot install (no torch) skips it.
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="needs the torch side: pip install '.[export]' (absent on a robot install)")


def import_or_skip(module: str, extra: str, apt: str | None = None):
    """``pytest.importorskip`` that also skips, with the apt command, when the module is installed but a
    system library it loads is missing (pytest's own only skips a module that is not installed)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise
        pytest.skip(f"{module} not installed: pip install 'molmoact-edge[{extra}]'", allow_module_level=True)
    except ImportError as e:
        if "cannot open shared object file" not in str(e):
            raise
        fix = f"apt-get install -y {apt}" if apt else "install the system package that provides it"
        pytest.skip(f"{module} is installed but a system library it needs is missing ({e}): {fix}",
                    allow_module_level=True)


def fixture_dirs() -> list[Path]:
    """Every tiny checkpoint fixture present (A always; B and later ones if shipped)."""
    return sorted(p for p in FIXTURES.glob("molmoact-tiny-*") if (p / "checkpoint" / "config.json").exists())


@pytest.fixture(scope="session")
def fixture_a() -> Path:
    if not (FIXTURE_A / "checkpoint" / "config.json").exists():
        pytest.skip(MISSING_FIXTURES)
    return FIXTURE_A


# A robot install has no torch to export with: CI exports the fixture bundles in the torch environment
# and hands them over through this variable (DIR/molmoact-tiny-a/, ...), so the onnxruntime tests run
# there too instead of skipping.
BUNDLES_ENV = "MOLMOACT_TEST_BUNDLES"


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> dict[Path, Path]:
    """Every fixture's checkpoint as an fp32 bundle: fixture dir -> bundle dir (shared, read-only)."""
    given = os.environ.get(BUNDLES_ENV)
    if given:
        out = {d: Path(given) / d.name for d in fixture_dirs()}
        missing = [str(b) for b in out.values() if not (b / "manifest.json").exists()]
        if missing:
            pytest.fail(f"{BUNDLES_ENV}={given} lacks the bundles {missing}; export each with `molmoact-edge "
                        f"export --checkpoint FIXTURE/checkpoint --out {given}/FIXTURE_NAME`, or unset it",
                        pytrace=False)
        return out
    pytest.importorskip("torch", reason=f"no torch to export the fixture bundles: set {BUNDLES_ENV} to bundles "
                                        "exported where torch is installed (see .ci/run)")
    from molmoact_edge.export.onnx_export import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    return {d: export_bundle(d / "checkpoint", root / d.name, progress=lambda s: None) for d in fixture_dirs()}


@pytest.fixture(scope="session")
def bundle_a(bundles, fixture_a) -> Path:
    return bundles[fixture_a]


@pytest.fixture(scope="session")
def checkpoint_a(fixture_a: Path) -> Path:
    return fixture_a / "checkpoint"


class GoldenCase:
    """One case of a golden fixture: inputs as the official run saw them, and its outputs."""

    def __init__(self, fixture: Path, name: str):
        import re

        import numpy as np

        self.fixture, self.name = fixture, name
        self.npz = np.load(fixture / "cases" / f"{name}.npz")
        self.image_paths = [fixture / "cases" / str(f) for f in self.npz["image_files"]]
        self.template = "multi" if str(self.npz["images_layout"]) == "nested" else "single"
        m = re.match(r"The task is (.*?)\. What is the action", str(self.npz["prompt"]))
        assert m, f"cannot read the instruction from {name}'s prompt"
        self.instruction = m.group(1)

    def __getitem__(self, key):
        return self.npz[key]

    def images(self):
        from PIL import Image

        return [Image.open(p).convert("RGB") for p in self.image_paths]


def golden_cases() -> list:
    """(fixture dir, case name) of every golden case; without fixtures one skipped placeholder that says
    what is missing (an empty list would skip with pytest's opaque "got empty parameter set")."""
    out = []
    for d in fixture_dirs():
        for npz in sorted((d / "cases").glob("*.npz")):
            out.append((d, npz.stem))
    return out or [pytest.param(None, id="no-fixtures", marks=pytest.mark.skip(reason=MISSING_FIXTURES))]


def case_id(item) -> str:
    if hasattr(item, "marks"):  # the placeholder of golden_cases()
        return item.id
    return f"{item[0].name}/{item[1]}"


def run_generate_json(case: GoldenCase, source: list[str], extra: list[str] = ()) -> dict:
    """Run the user-facing ``molmoact-edge generate --json`` on a golden case's images and
    instruction; ``source`` selects the model (``--checkpoint DIR`` or ``--bundle DIR ...``)."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "molmoact_edge", "generate", *source, "--instruction", case.instruction,
           "--template", case.template, "--json", *extra]
    for p in case.image_paths:
        cmd += ["--image", str(p)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def tokenizer_a(checkpoint_a):
    from molmoact_edge.runtime.engine.tokenizer import Tokenizer

    return Tokenizer.from_checkpoint(checkpoint_a)


@pytest.fixture(scope="session")
def config_a(checkpoint_a):
    from molmoact_edge.runtime.engine.config import ModelConfig

    return ModelConfig.load(checkpoint_a)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny checkpoint in the official layout (needs torch; the tests that use it import it)."""
    from molmoact_edge.export.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=3)


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint for a test to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst
