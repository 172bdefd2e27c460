"""Intel RealSense cameras through pyrealsense2: colour + depth aligned to colour, by serial number.

pyrealsense2 is imported lazily (`pip install molmoact-edge[robot]`). Devices are enumerated before a
pipeline starts because `pipeline.start()` with nothing attached blocks for about 15 s before it
fails; enumerating takes milliseconds and lets the error name the fix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .camera import CameraError, Clock, Intrinsics, ThreadedCamera
from .deps import require

NO_DEVICE_FIX = (
    "Check that the camera is on a USB3 port and cable (`lsusb` shows 8086:0b07/0b3a/...), that the "
    "librealsense udev rules are installed (librealsense's scripts/setup_udev_rules.sh, or run as root), "
    "and that no other process (realsense-viewer, another run) holds it; or run offline with "
    "--camera replay:PATH."
)


def rs_module():
    return require("pyrealsense2", "pyrealsense2")


@dataclass(frozen=True)
class RealSenseDevice:
    serial: str
    name: str
    usb: str
    firmware: str


def list_devices() -> list[RealSenseDevice]:
    rs = rs_module()
    out = []
    for d in rs.context().query_devices():
        def info(key, d=d):
            return d.get_info(key) if d.supports(key) else ""

        out.append(
            RealSenseDevice(
                serial=info(rs.camera_info.serial_number),
                name=info(rs.camera_info.name),
                usb=info(rs.camera_info.usb_type_descriptor),
                firmware=info(rs.camera_info.firmware_version),
            )
        )
    return out


@dataclass(frozen=True)
class RealSenseConfig:
    serial: str | None = None  # None: the only attached camera (an error if there are several)
    width: int = 640
    height: int = 480
    fps: int = 30
    depth: bool = True
    record_to: str | None = None  # a .db3 path: pyrealsense2 2.59 records rosbag2/SQLite only
    frame_timeout_ms: int = 1000

    def __post_init__(self) -> None:
        if self.fps not in (6, 15, 30, 60, 90):
            raise ValueError(f"RealSenseConfig.fps must be one of 6, 15, 30, 60, 90, got {self.fps}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"RealSenseConfig.width/height must be positive, got {self.width}x{self.height}")
        if self.record_to is not None and not str(self.record_to).endswith(".db3"):
            raise ValueError(
                f"RealSenseConfig.record_to must end in .db3 (pyrealsense2 >= 2.56 writes rosbag2 "
                f"SQLite recordings and refuses other extensions), got {self.record_to!r}"
            )


def resolve_serial(serial: str | None, devices: list[RealSenseDevice]) -> str:
    """Pick the device to open, or raise CameraError naming what was found and the fix."""
    if not devices:
        raise CameraError(f"No RealSense camera found (pyrealsense2 enumerates 0 devices). {NO_DEVICE_FIX}")
    found = ", ".join(f"{d.name} serial {d.serial} ({'USB ' + d.usb if d.usb else 'USB ?'})" for d in devices)
    if serial is None:
        if len(devices) > 1:
            raise CameraError(f"Several RealSense cameras are attached ({found}); choose one with --camera realsense:SERIAL")
        return devices[0].serial
    if serial not in {d.serial for d in devices}:
        raise CameraError(f"No RealSense camera with serial {serial}; attached: {found}. {NO_DEVICE_FIX}")
    return serial


class PipelineCamera(ThreadedCamera):
    """What a live RealSense and a recording's playback share: one pyrealsense2 pipeline, an
    optional depth-to-colour alignment, the depth scale, and a release that tolerates a pipeline
    already stopped (a device unplugged)."""

    def __init__(self, name: str, clock: Clock = time.monotonic) -> None:
        super().__init__(name=name, clock=clock)
        self._pipeline = None
        self._align = None
        self._depth_scale = 0.001

    def _start(self, rs, cfg, explain: Callable[[RuntimeError], str]):
        """Start a pipeline on `cfg` and return its profile; a failure raises CameraError(explain(e))."""
        pipeline = rs.pipeline()
        try:
            profile = pipeline.start(cfg)
        except RuntimeError as e:
            raise CameraError(explain(e)) from e
        self._pipeline = pipeline
        return profile

    def _read_depth_scale(self, profile) -> None:
        try:
            self._depth_scale = float(profile.get_device().first_depth_sensor().get_depth_scale())
        except RuntimeError:
            self._depth_scale = 0.001  # a recording without the sensor's options: librealsense's default

    def _arrays(self, fs, with_depth: bool = True):
        if not with_depth:
            return frameset_to_arrays(fs, self._depth_scale, with_depth=False)
        if self._align is not None:
            fs = self._align.process(fs)
        return frameset_to_arrays(fs, self._depth_scale)

    def _release(self) -> None:
        if self._pipeline is not None:
            try:
                self._pipeline.stop()
            except RuntimeError:
                pass  # already stopped (device unplugged); nothing left to release
            self._pipeline = None


class RealSenseCamera(PipelineCamera):
    def __init__(self, config: RealSenseConfig = RealSenseConfig(), clock: Clock = time.monotonic) -> None:
        super().__init__(name=f"realsense:{config.serial or 'auto'}", clock=clock)
        self.config = config

    def _open(self) -> Intrinsics:
        rs = rs_module()
        c = self.config
        serial = resolve_serial(c.serial, list_devices())
        self.name = f"realsense:{serial}"
        cfg = rs.config()
        cfg.enable_device(serial)
        cfg.enable_stream(rs.stream.color, c.width, c.height, rs.format.rgb8, c.fps)
        if c.depth:
            cfg.enable_stream(rs.stream.depth, c.width, c.height, rs.format.z16, c.fps)
        if c.record_to:
            Path(c.record_to).parent.mkdir(parents=True, exist_ok=True)
            cfg.enable_record_to_file(str(c.record_to))
        profile = self._start(rs, cfg, lambda e: (
            f"RealSense {serial} did not start {c.width}x{c.height}@{c.fps} colour"
            f"{' + depth' if c.depth else ''}: {e}. Try another resolution/fps that the model "
            f"supports (`rs-enumerate-devices -s`) or a USB3 port. {NO_DEVICE_FIX}"))
        if c.depth:
            self._read_depth_scale(profile)
            self._align = rs.align(rs.stream.color)
        return intrinsics_from_profile(profile.get_stream(rs.stream.color))

    def _grab(self):
        return self._arrays(self._pipeline.wait_for_frames(self.config.frame_timeout_ms))


def intrinsics_from_profile(stream_profile) -> Intrinsics:
    i = stream_profile.as_video_stream_profile().get_intrinsics()
    return Intrinsics(
        width=i.width,
        height=i.height,
        fx=float(i.fx),
        fy=float(i.fy),
        ppx=float(i.ppx),
        ppy=float(i.ppy),
        model=str(i.model).split(".")[-1],
        coeffs=tuple(float(v) for v in i.coeffs),
    )


def frameset_to_arrays(fs, depth_scale: float, with_depth: bool = True):
    """(colour RGB uint8 copy, depth uint16 copy or None, scale, device ms) from a frameset.

    Copies because librealsense recycles frame buffers once the frameset is released.
    """
    color = fs.get_color_frame()
    if not color:
        raise CameraError("frameset without a colour frame; enable the colour stream")
    rgb = np.array(np.asanyarray(color.get_data()), copy=True)
    depth_frame = fs.get_depth_frame() if with_depth else None
    depth = np.array(np.asanyarray(depth_frame.get_data()), copy=True) if depth_frame else None
    return rgb, depth, depth_scale, float(fs.get_timestamp())
