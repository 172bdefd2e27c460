"""Writing camera recordings: pyrealsense2 `.db3` files and plain image folders.

pyrealsense2 2.59 writes rosbag2 recordings (SQLite, `.db3`) and refuses any other extension; the
older ROS1 `.bag` format is read-only history. Frames from any `Camera` (a live RealSense, a replay,
a test pattern) are injected into a pyrealsense2 *software device* wrapped by `rs.recorder`, so that
the file is a genuine librealsense recording: `realsense-viewer` and `ReplayCamera` both play it.

Recording is lossless (compression off) so that a replay reproduces the exact pixels the policy saw.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from .camera import Camera, CameraError, Frame, Intrinsics
from .realsense import rs_module

log = logging.getLogger(__name__)


def _video_stream(rs, kind, uid: int, intr: Intrinsics, fps: int, fmt, bpp: int):
    ri = rs.intrinsics()
    ri.width, ri.height = intr.width, intr.height
    ri.fx, ri.fy, ri.ppx, ri.ppy = intr.fx, intr.fy, intr.ppx, intr.ppy
    ri.model = getattr(rs.distortion, intr.model, rs.distortion.none)
    ri.coeffs = list(intr.coeffs)
    vs = rs.video_stream()
    vs.type, vs.index, vs.uid = kind, 0, uid
    vs.width, vs.height, vs.fps, vs.bpp, vs.fmt = intr.width, intr.height, fps, bpp, fmt
    vs.intrinsics = ri
    return vs


class DB3Writer:
    """Write colour (+ aligned depth) frames into a pyrealsense2 `.db3` recording."""

    def __init__(self, path: str | Path, intrinsics: Intrinsics, depth: bool = True, fps: int = 30,
                 depth_scale: float = 0.001, name: str = "molmoact-edge recording", serial: str = "000000000000") -> None:
        path = Path(path)
        if path.suffix != ".db3":
            raise ValueError(f"recording path must end in .db3 (pyrealsense2 2.59 writes rosbag2 only), got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()  # the recorder appends to an existing database, which corrupts timing
        rs = rs_module()
        self._rs = rs
        self.path = path
        self.intrinsics = intrinsics
        self.depth_scale = depth_scale
        self._index = 0
        self._t0: float | None = None
        dev = rs.software_device()
        dev.register_info(rs.camera_info.name, name)
        dev.register_info(rs.camera_info.serial_number, serial)
        self._sensors = []
        self._depth_profile = None
        if depth:
            ds = dev.add_sensor("Depth")
            self._depth_profile = ds.add_video_stream(
                _video_stream(rs, rs.stream.depth, 0, intrinsics, fps, rs.format.z16, 2)
            ).as_video_stream_profile()
            ds.add_read_only_option(rs.option.depth_units, depth_scale)
            self._sensors.append((ds, self._depth_profile))
        cs = dev.add_sensor("Color")
        self._color_profile = cs.add_video_stream(
            _video_stream(rs, rs.stream.color, 1, intrinsics, fps, rs.format.rgb8, 3)
        ).as_video_stream_profile()
        self._sensors.append((cs, self._color_profile))
        if self._depth_profile is not None:
            # Depth is already aligned to colour: identity extrinsics keep rs.align a no-op on replay.
            self._depth_profile.register_extrinsics_to(self._color_profile, rs.extrinsics())
        self._device = dev
        self._recorder = rs.recorder(str(path), dev, False)  # False: no (lossy) compression
        for sensor, profile in self._sensors:
            sensor.open(profile)
            sensor.start(lambda f: None)

    def write(self, color: np.ndarray, depth: np.ndarray | None, timestamp_s: float) -> None:
        rs = self._rs
        if self._t0 is None:
            self._t0 = timestamp_s
        ts_ms = (timestamp_s - self._t0) * 1000.0
        h, w = self.intrinsics.height, self.intrinsics.width
        if color.shape != (h, w, 3):
            raise ValueError(f"colour frame {color.shape} does not match the recording's {h}x{w}x3")
        # depth None in a recording with depth: this instant has none (a dropped depth frame, or a
        # replay's colour frame that had no depth of its own instant); the replay delivers it so.
        if self._depth_profile is not None and depth is not None:
            if depth.shape != (h, w):
                raise ValueError(f"depth frame {depth.shape} does not match the recording's {h}x{w}")
            self._inject(self._sensors[0][0], self._depth_profile, np.ascontiguousarray(depth, np.uint16), 2, ts_ms)
        self._inject(self._sensors[-1][0], self._color_profile, np.ascontiguousarray(color, np.uint8), 3, ts_ms)
        self._index += 1

    def _inject(self, sensor, profile, pixels: np.ndarray, bpp: int, ts_ms: float) -> None:
        rs = self._rs
        f = rs.software_video_frame()
        f.pixels = pixels
        f.bpp = bpp
        f.stride = pixels.shape[1] * bpp
        f.timestamp = ts_ms
        f.domain = rs.timestamp_domain.system_time
        f.frame_number = self._index
        f.profile = profile
        if bpp == 2:
            f.depth_units = self.depth_scale
        sensor.on_video_frame(f)

    def close(self) -> None:
        if self._recorder is None:
            return
        for sensor, _ in self._sensors:
            sensor.stop()
            sensor.close()
        # Dropping the recorder finalises the SQLite file; nothing else flushes it.
        self._recorder = None
        self._sensors = []
        self._device = None

    def __enter__(self) -> DB3Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FolderWriter:
    """Write frames as `color/NNNNNN.png` (+ `depth/NNNNNN.png`, 16-bit) with intrinsics.json and timestamps."""

    def __init__(self, path: str | Path, intrinsics: Intrinsics, depth_scale: float = 0.001) -> None:
        from PIL import (
            Image,  # core dependency; imported here to keep hardware import light
        )

        self._Image = Image
        self.path = Path(path)
        (self.path / "color").mkdir(parents=True, exist_ok=True)
        self.intrinsics = intrinsics
        self.depth_scale = depth_scale
        self._stamps: list[float] = []
        (self.path / "intrinsics.json").write_text(json.dumps(intrinsics.to_dict() | {"depth_scale": depth_scale}, indent=1))

    def write(self, color: np.ndarray, depth: np.ndarray | None, timestamp_s: float) -> None:
        i = len(self._stamps)
        self._Image.fromarray(color).save(self.path / "color" / f"{i:06d}.png")
        if depth is not None:
            (self.path / "depth").mkdir(exist_ok=True)
            self._Image.fromarray(np.asarray(depth, np.uint16)).save(self.path / "depth" / f"{i:06d}.png")
        self._stamps.append(timestamp_s)

    def close(self) -> None:
        t0 = self._stamps[0] if self._stamps else 0.0
        (self.path / "timestamps.txt").write_text("".join(f"{t - t0:.6f}\n" for t in self._stamps))

    def __enter__(self) -> FolderWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RecordingExistsError(FileExistsError):
    """The output already holds a recording; writing into it would mix two takes."""


# What a recording consists of: a .db3 file, or these entries of an image folder.
TAKE_ENTRIES = ("color", "depth", "intrinsics.json", "timestamps.txt")


def check_target(path: str | Path, force: bool = False) -> None:
    """Refuse to record into an existing take (its frames and timestamps would mix with the new
    ones); with ``force`` remove the old take first (only the files a take consists of)."""
    path = Path(path)
    if str(path).endswith(".db3"):
        old = [path] if path.exists() else []
    else:
        if path.exists() and not path.is_dir():
            raise RecordingExistsError(f"{path} is a file, not a folder; give a folder or a .db3 path to record to")
        old = [path / e for e in TAKE_ENTRIES if (path / e).exists()]
    if not old:
        return
    if not force:
        raise RecordingExistsError(f"{path} already holds a recording; choose another --out or pass --force "
                                   "to replace it")
    for p in old:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def open_writer(path: str | Path, intrinsics: Intrinsics, depth: bool, fps: int = 30, depth_scale: float = 0.001):
    """A .db3 path gives a pyrealsense2 recording; anything else an image folder."""
    if str(path).endswith(".db3"):
        return DB3Writer(path, intrinsics, depth=depth, fps=fps, depth_scale=depth_scale)
    return FolderWriter(path, intrinsics, depth_scale=depth_scale)


def record(camera: Camera, path: str | Path, seconds: float, fps: int = 30, clock=time.monotonic,
           force: bool = False) -> int:
    """Record every new frame of a connected camera for `seconds`; returns the number written.
    An existing take at ``path`` is refused unless ``force`` (see :func:`check_target`).

    Frames are written from the capture thread when the camera supports `subscribe` (none is missed);
    otherwise the latest frame is polled at twice the frame rate.
    """
    check_target(path, force)
    first: Frame | None = None
    deadline = clock() + 5.0
    while first is None:
        first = camera.latest()
        if first is None:
            if clock() > deadline:
                raise CameraError(f"camera {camera.name} delivered no frame within 5 s; nothing to record")
            time.sleep(0.002)
    written: list[int] = []
    with open_writer(path, first.intrinsics, first.depth is not None, fps, first.depth_scale) as w:
        def sink(f: Frame) -> None:
            if not written or f.index != written[-1]:
                w.write(f.color, f.depth, f.timestamp)
                written.append(f.index)

        end = clock() + seconds
        if hasattr(camera, "subscribe"):
            camera.subscribe(sink)
            try:
                while clock() < end and not getattr(camera, "finished", threading.Event()).is_set():
                    time.sleep(0.01)
            finally:
                camera.unsubscribe(sink)
        else:
            while clock() < end:
                f = camera.latest()
                if f is not None:
                    sink(f)
                time.sleep(0.5 / fps)
    log.info("recorded %d frames from %s to %s", len(written), camera.name, path)
    return len(written)
