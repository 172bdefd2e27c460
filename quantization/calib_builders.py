"""Build calibration sets from what users have: `molmoact-edge record` outputs (a ``.db3``
pyrealsense2 recording or an image folder, one per camera view) and plain image folders with an
instruction list.

Instructions: one string for every sample, or exactly one per sample (a list, or a text file with
one instruction per line).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from molmoact_edge.quantization.calibration import CalibrationError, write_calibration_set

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_instructions(spec: str | Path | list[str]) -> list[str]:
    """A list as is; a path to a text file -> its non-empty lines; any other string -> [it]."""
    if isinstance(spec, list):
        return [s.strip() for s in spec]
    p = Path(spec)
    if p.suffix == ".txt" or p.is_file():
        if not p.is_file():
            raise CalibrationError(f"instruction file {p} does not exist")
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        if not lines:
            raise CalibrationError(f"instruction file {p} holds no instruction (one per line expected)")
        return lines
    return [str(spec).strip()]


def _per_sample(instructions: list[str], n: int) -> list[str]:
    if len(instructions) == 1:
        return instructions * n
    if len(instructions) != n:
        raise CalibrationError(f"{len(instructions)} instructions for {n} samples: give one instruction for all "
                               "samples or exactly one per sample")
    return instructions


def _folder_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CalibrationError(f"image folder {folder} does not exist")
    # `molmoact-edge record` folders keep colour frames in color/ (depth is not a model input)
    src = folder / "color" if (folder / "color").is_dir() else folder
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"{src} holds no .png/.jpg images")
    return files


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def _evenly(n_total: int, n: int | None) -> list[int]:
    if n is None or n >= n_total:
        return list(range(n_total))
    return [round(i * (n_total - 1) / (n - 1)) for i in range(n)] if n > 1 else [0]


def from_image_folders(views: dict[str, str | Path], instructions: str | Path | list[str], out: str | Path,
                       provenance: str, licence: str, n_samples: int | None = None,
                       evaluation_fraction: float = 0.25, force: bool = False) -> Path:
    """One sample per image index: the k-th image (sorted by name) of every view's folder, with the
    k-th instruction. Folders of different lengths are refused (views must be synchronised);
    ``n_samples`` picks evenly spaced indices."""
    files = {v: _folder_images(Path(p)) for v, p in views.items()}
    lengths = {v: len(f) for v, f in files.items()}
    if len(set(lengths.values())) != 1:
        raise CalibrationError(f"views hold different numbers of images {lengths}; give synchronised folders")
    n_images = next(iter(lengths.values()))
    idx = _evenly(n_images, n_samples)
    instr = _per_sample(read_instructions(instructions), n_images)  # one per image index (or one for all)
    samples = [(instr[i], {v: _read_rgb(files[v][i]) for v in views}) for i in idx]
    return write_calibration_set(out, samples, tuple(views), provenance, licence, evaluation_fraction, force,
                                 extra={"source": {v: str(p) for v, p in views.items()}})


def _recording_frames(path: Path) -> list[np.ndarray]:
    """Every colour frame of a record output, in order (a .db3 through the replay camera)."""
    if path.is_dir():
        return [_read_rgb(p) for p in _folder_images(path)]
    if path.suffix not in (".db3", ".bag"):
        raise CalibrationError(f"{path}: expected a .db3 recording or an image folder (`molmoact-edge record` output)")
    if not path.is_file():
        raise CalibrationError(f"recording {path} does not exist")
    from molmoact_edge.hardware.replay import ReplayConfig, open_replay

    frames: list[np.ndarray] = []
    cam = open_replay(ReplayConfig(str(path), loop=False, realtime=False))
    cam.subscribe(lambda f: frames.append(f.color.copy()))
    with cam:
        if not cam.finished.wait(600.0):
            raise CalibrationError(f"{path}: replay did not reach the end within 10 minutes")
    if cam.error is not None:
        raise CalibrationError(f"{path}: replay failed ({cam.error})")
    if not frames:
        raise CalibrationError(f"{path}: the recording holds no colour frame")
    return frames


def from_recordings(views: dict[str, str | Path], instructions: str | Path | list[str], out: str | Path,
                    provenance: str, licence: str, n_samples: int = 32, evaluation_fraction: float = 0.25,
                    force: bool = False) -> Path:
    """``n_samples`` evenly spaced frames of each view's recording (same relative position in each)."""
    frames = {v: _recording_frames(Path(p)) for v, p in views.items()}
    n = min(n_samples, *(len(f) for f in frames.values()))
    instr = _per_sample(read_instructions(instructions), n)
    samples = []
    for k in range(n):
        pick = {v: f[_evenly(len(f), n)[k]] for v, f in frames.items()}
        samples.append((instr[k], pick))
    return write_calibration_set(out, samples, tuple(views), provenance, licence, evaluation_fraction, force,
                                 extra={"source": {v: str(p) for v, p in views.items()}})
