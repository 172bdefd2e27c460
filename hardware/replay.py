"""Replay cameras: the same `Camera` interface fed from a recording instead of a sensor.

Two sources: a pyrealsense2 recording (`.db3`, what 2.59's recorder writes; ROS1 `.bag` files from
older librealsense versions are handed to the same playback, untested since 2.59 cannot write one)
and a plain image folder
(`color/*.png|jpg` or images at the top level, optional `depth/*.png` 16-bit, `intrinsics.json`,
`timestamps.txt`). Frames are paced at the recorded rate and stamped with the host clock on
arrival, exactly like a live camera, so the control loop cannot tell the difference.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .camera import CameraError, Clock, Intrinsics, ThreadedCamera
from .realsense import PipelineCamera, intrinsics_from_profile, rs_module

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def same_instant(color_ms: float, depth_ms: float, fps: float) -> bool:
    """Whether a colour and a depth frame of one frameset were captured together: their device
    timestamps lie within half a frame period. librealsense's pipeline always hands out complete
    framesets: where one stream's frame is missing (not recorded, or not read yet in a replay
    faster than real time) it puts in that stream's previous frame. Measured: colour 2 delivered a
    second time beside depth 3 (1 replay of 19 frames in 62), and colour 5 beside depth 4 where
    depth 5 was never recorded."""
    return abs(color_ms - depth_ms) <= 500.0 / fps


@dataclass(frozen=True)
class ReplayConfig:
    path: str
    loop: bool = True  # restart at the end, so a short recording can drive a long run
    realtime: bool = True  # pace at the recorded rate; False delivers frames as fast as read
    fps: float = 30.0  # image folders without timestamps.txt

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("ReplayConfig.path must name a .db3/.bag recording or an image folder")
        if self.fps <= 0:
            raise ValueError(f"ReplayConfig.fps must be positive, got {self.fps}")


def open_replay(config: ReplayConfig, clock: Clock = time.monotonic) -> ThreadedCamera:
    p = Path(config.path)
    if not p.exists():
        raise CameraError(f"replay source {p} does not exist; pass a .db3 recording or an image folder")
    if p.is_dir():
        return FolderReplayCamera(config, clock)
    if p.suffix in (".db3", ".bag"):
        return RecordingReplayCamera(config, clock)
    raise CameraError(f"replay source {p}: expected a .db3 (or .bag) recording or an image folder")


class RecordingReplayCamera(PipelineCamera):
    def __init__(self, config: ReplayConfig, clock: Clock = time.monotonic) -> None:
        super().__init__(name=f"replay:{Path(config.path).name}", clock=clock)
        self.config = config
        self.unpaired = 0  # framesets whose colour and depth were not captured together
        self._last_color = -1  # frame numbers of the last colour frame delivered and of the last depth
        self._last_depth = -1  # frame delivered beside one (each stream counts its own frames)
        self._fps = 30.0

    def _open(self) -> Intrinsics:
        rs = rs_module()
        cfg = rs.config()
        cfg.enable_device_from_file(str(self.config.path), repeat_playback=self.config.loop)
        profile = self._start(rs, cfg, lambda e: f"cannot play {self.config.path}: {e}. Is it a librealsense recording?")
        self._rs = rs
        playback = profile.get_device().as_playback()
        playback.set_real_time(self.config.realtime)
        streams = {s.stream_type(): s for s in profile.get_streams()}
        if rs.stream.color not in streams:
            self._release()
            raise CameraError(f"{self.config.path} has no colour stream; the policy needs RGB images")
        color_intr = intrinsics_from_profile(streams[rs.stream.color])
        if rs.stream.depth in streams:
            self._read_depth_scale(profile)
            # Recordings written by DB3Writer already hold depth aligned to colour (same intrinsics);
            # re-aligning would resample it. A raw RealSense recording has distinct depth optics.
            if intrinsics_from_profile(streams[rs.stream.depth]) != color_intr:
                self._align = rs.align(rs.stream.color)
        self._playback = playback
        self._fps = float(streams[rs.stream.color].fps())
        return color_intr

    def _grab(self):
        while not self._stop.is_set():
            ok, fs = self._pipeline.try_wait_for_frames(200)
            if not ok:
                if self._playback.current_status() == self._rs.playback_status.stopped:
                    return None  # end of a non-looping recording
                continue
            color, depth = fs.get_color_frame(), fs.get_depth_frame()
            if not color:
                continue
            # A replay reproduces the pairs that were recorded: a colour frame beside a depth frame
            # of another instant is delivered once, without depth. The pipeline's filler is the
            # stream's previous frame, so a frame number seen before gives it away even where the
            # instants lie closer than half a period (a recording of a replay on a busy CPU is
            # stamped on arrival, in bursts: measured 10 of 30 framesets pairing neighbours 5 ms apart).
            c, d = color.get_frame_number(), depth.get_frame_number() if depth else None
            old_color, old_depth = c == self._last_color, bool(depth) and d == self._last_depth
            if depth and old_color and not old_depth:
                continue  # the colour frame already delivered, filled in beside the next depth frame
            paired = not depth or (not (old_depth and not old_color)  # a new colour beside the filler depth
                                   and same_instant(color.get_timestamp(), depth.get_timestamp(), self._fps))
            if not paired:
                self.unpaired += 1
                if old_color:
                    continue
            self._last_color = c
            if paired and depth:
                self._last_depth = d
            return self._arrays(fs, with_depth=paired)
        return None


class FolderReplayCamera(ThreadedCamera):
    def __init__(self, config: ReplayConfig, clock: Clock = time.monotonic) -> None:
        super().__init__(name=f"replay:{Path(config.path).name}", clock=clock)
        self.config = config
        self._colors: list[Path] = []
        self._depths: list[Path | None] = []
        self._stamps: list[float] = []
        self._depth_scale = 0.001
        self._i = 0
        self._start = 0.0

    def _open(self) -> Intrinsics:
        from PIL import Image

        root = Path(self.config.path)
        cdir = root / "color" if (root / "color").is_dir() else root
        self._colors = sorted(p for p in cdir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._colors:
            raise CameraError(f"image folder {root} holds no .png/.jpg images (looked in {cdir})")
        ddir = root / "depth"
        self._depths = [(ddir / (p.stem + ".png")) if (ddir / (p.stem + ".png")).exists() else None for p in self._colors]
        if (root / "timestamps.txt").exists():
            self._stamps = [float(v) for v in (root / "timestamps.txt").read_text().split()]
        if len(self._stamps) != len(self._colors):
            self._stamps = [i / self.config.fps for i in range(len(self._colors))]
        with Image.open(self._colors[0]) as im:
            w, h = im.size
        meta = root / "intrinsics.json"
        if meta.exists():
            d = json.loads(meta.read_text())
            self._depth_scale = float(d.pop("depth_scale", 0.001))
            d["coeffs"] = tuple(d.get("coeffs", (0.0,) * 5))
            intr = Intrinsics(**d)
            if (intr.width, intr.height) != (w, h):
                raise CameraError(f"{meta} says {intr.width}x{intr.height} but the images are {w}x{h}")
            return intr
        return Intrinsics.default_for(w, h)

    def _grab(self):
        from PIL import Image

        if self._i >= len(self._colors):
            if not self.config.loop:
                return None
            self._i = 0
        i = self._i
        if self.config.realtime:
            now = time.monotonic()
            if i == 0:
                self._start = now
            due = self._start + self._stamps[i] - self._stamps[0]
            if i > 0 and due <= now - 1.0:
                self._start = now - (self._stamps[i] - self._stamps[0])  # fell behind; do not burst
            while time.monotonic() < due and not self._stop.is_set():
                time.sleep(min(0.005, max(0.0, due - time.monotonic())))
        with Image.open(self._colors[i]) as im:
            color = np.array(im.convert("RGB"))
        depth = None
        if self._depths[i] is not None:
            with Image.open(self._depths[i]) as im:
                depth = np.array(im).astype(np.uint16)
        self._i += 1
        return color, depth, self._depth_scale, self._stamps[i] * 1000.0
