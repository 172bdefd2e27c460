"""Calibration sets: images per view + an instruction per sample, described by a manifest.

A calibration set is a folder::

    manifest.json
    images/<sample id>_<view>.png

``manifest.json`` holds the format and version, provenance and licence (where the images came
from and under which terms), the view names, one entry per sample (id, split, instruction, one
image per view) and the sha256 of every file. Two splits: ``calibration`` (what quantisers may
look at) and ``evaluation`` (held out, for measuring what a quantised bundle does on unseen inputs).

The set's identity is the sha256 of its ``manifest.json``: the manifest lists every file's hash,
so any change to an image or an instruction changes it, and a quantised bundle records it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

FORMAT = "molmoact-edge-calibration"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("calibration", "evaluation")
DEFAULT_SET = "default"


class CalibrationError(ValueError):
    """A calibration set that cannot be used; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Sample:
    id: str
    split: str
    instruction: str
    images: dict[str, Path]  # view -> file

    def load_images(self, views: tuple[str, ...]) -> list[np.ndarray]:
        """RGB uint8 arrays in the set's view order (first = main view)."""
        from PIL import Image

        out = []
        for v in views:
            with Image.open(self.images[v]) as im:
                out.append(np.array(im.convert("RGB")))
        return out


@dataclass(frozen=True)
class CalibrationSet:
    path: Path
    views: tuple[str, ...]
    samples: tuple[Sample, ...]
    provenance: str
    licence: str
    sha256: str  # of manifest.json

    def split(self, name: str) -> tuple[Sample, ...]:
        if name not in SPLITS:
            raise CalibrationError(f"unknown split {name!r}; accepted: {list(SPLITS)}")
        return tuple(s for s in self.samples if s.split == name)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    return _sha256_bytes(path.read_bytes())


def default_set_path() -> Path:
    """The set shipped with the package (installed as package data, so a wheel install has it)."""
    return Path(str(resources.files("molmoact_edge.calibration_data").joinpath(DEFAULT_SET)))


def load_calibration_set(path: str | Path | None = None, verify: bool = True) -> CalibrationSet:
    """Read and check a set (format, splits, views, every file's sha256); ``None`` = the shipped set."""
    root = Path(path) if path is not None else default_set_path()
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise CalibrationError(f"{root} is not a calibration set: {MANIFEST} is missing; build one with "
                               "molmoact_edge.quantization.calib_builders (from image folders or recordings)")
    raw_bytes = mpath.read_bytes()
    try:
        raw = json.loads(raw_bytes)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{mpath} is not valid JSON ({e}); rebuild the set") from e
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise CalibrationError(f"{mpath}: format {raw.get('format')!r} v{raw.get('format_version')!r}, expected "
                               f"{FORMAT!r} v{FORMAT_VERSION}; rebuild the set with this molmoact-edge")
    for key in ("provenance", "licence", "views", "samples", "files"):
        if key not in raw:
            raise CalibrationError(f"{mpath}: missing {key!r}; rebuild the set")
    views = tuple(raw["views"])
    if not views:
        raise CalibrationError(f"{mpath}: 'views' is empty; a set needs at least one camera view")
    files = raw["files"]
    for rel, digest in files.items():
        f = _inside(root, rel)
        if not f.is_file():
            raise CalibrationError(f"{root}: {rel} listed in {MANIFEST} is missing; copy the whole set folder")
        if verify and _sha256_file(f) != digest:
            raise CalibrationError(f"{root}: {rel} does not match its sha256 in {MANIFEST} (changed after the "
                                   "set was built); rebuild the set or restore the file")
    samples = []
    for s in raw["samples"]:
        if s.get("split") not in SPLITS:
            raise CalibrationError(f"{mpath}: sample {s.get('id')!r} has split {s.get('split')!r}; "
                                   f"accepted: {list(SPLITS)}")
        if set(s.get("images", {})) != set(views):
            raise CalibrationError(f"{mpath}: sample {s.get('id')!r} has views {sorted(s.get('images', {}))}, "
                                   f"the set declares {list(views)}")
        for rel in s["images"].values():
            if rel not in files:
                raise CalibrationError(f"{mpath}: {rel} (sample {s['id']}) is not hashed in 'files'; rebuild the set")
        if not str(s.get("instruction", "")).strip():
            raise CalibrationError(f"{mpath}: sample {s.get('id')!r} has no instruction")
        samples.append(Sample(s["id"], s["split"], s["instruction"],
                              {v: _inside(root, rel) for v, rel in s["images"].items()}))
    for split in SPLITS:
        if not any(s.split == split for s in samples):
            raise CalibrationError(f"{mpath}: the {split!r} split is empty; a set needs both {list(SPLITS)}")
    return CalibrationSet(root, views, tuple(samples), raw["provenance"], raw["licence"], _sha256_bytes(raw_bytes))


def _inside(root: Path, rel: str) -> Path:
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise CalibrationError(f"{root}: file {rel!r} points outside the set folder; a set is self-contained")
    return p


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_calibration_set(out: str | Path, samples: list[tuple[str, dict[str, np.ndarray]]],
                          views: tuple[str, ...], provenance: str, licence: str,
                          evaluation_fraction: float = 0.25, force: bool = False, extra: dict | None = None) -> Path:
    """Write ``samples`` (instruction, {view: RGB uint8 array}) as a set. The last
    ``evaluation_fraction`` of samples (at least one) form the evaluation split, the rest calibrate."""
    out = Path(out)
    if not samples:
        raise CalibrationError("no samples to write: give at least two (one calibration, one evaluation)")
    if len(samples) < 2:
        raise CalibrationError("a set needs at least two samples: one for calibration, one held out")
    if not 0 < evaluation_fraction < 1:
        raise CalibrationError(f"evaluation_fraction must be in (0, 1), got {evaluation_fraction}")
    if not views or len(set(views)) != len(views):
        raise CalibrationError(f"views must be distinct names, got {list(views)}")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose another folder or pass force")
    n_eval = max(1, round(len(samples) * evaluation_fraction))
    (out / "images").mkdir(parents=True, exist_ok=True)
    files, entries = {}, []
    for i, (instruction, images) in enumerate(samples):
        if set(images) != set(views):
            raise CalibrationError(f"sample {i} has views {sorted(images)}, expected {list(views)}")
        if not instruction.strip():
            raise CalibrationError(f"sample {i} has an empty instruction")
        sid = f"{i:04d}"
        rels = {}
        for v in views:
            rel = f"images/{sid}_{v}.png"
            data = _png_bytes(images[v])
            (out / rel).write_bytes(data)
            files[rel] = _sha256_bytes(data)
            rels[v] = rel
        split = "evaluation" if i >= len(samples) - n_eval else "calibration"
        entries.append({"id": sid, "split": split, "instruction": instruction, "images": rels})
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "provenance": provenance, "licence": licence,
                "views": list(views), **(extra or {}), "samples": entries, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out
