"""The camera contract: a connected camera always offers its most recent frame.

A control loop never waits for a camera: each camera runs one capture thread that keeps only the
latest frame and stamps it with the host clock on arrival, so that the loop can judge how stale an
observation is on the same clock it schedules motions with.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

Clock = Callable[[], float]
CLOSE_TIMEOUT_S = 2.0  # the most a camera's close() waits for its capture thread


class CameraError(RuntimeError):
    """A camera could not be opened or stopped delivering frames; the message names the fix."""


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of the colour image (depth is aligned to it)."""

    width: int
    height: int
    fx: float
    fy: float
    ppx: float
    ppy: float
    model: str = "none"
    coeffs: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"Intrinsics.width/height must be positive, got {self.width}x{self.height}")
        if not (self.fx > 0 and self.fy > 0):
            raise ValueError(f"Intrinsics.fx/fy must be positive, got fx={self.fx}, fy={self.fy}")

    @classmethod
    def default_for(cls, width: int, height: int) -> Intrinsics:
        """A 60-degree horizontal field of view, for image folders that ship no intrinsics."""
        f = width / (2 * np.tan(np.radians(30)))
        return cls(width, height, float(f), float(f), width / 2, height / 2)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("width", "height", "fx", "fy", "ppx", "ppy", "model")} | {
            "coeffs": list(self.coeffs)
        }


@dataclass(frozen=True)
class Frame:
    """One observation from one camera.

    color: HxWx3 uint8 RGB. depth: HxW uint16 aligned to colour, or None; metres = depth * depth_scale.
    timestamp: host clock (the camera's clock function) when the frame reached the host.
    """

    color: np.ndarray
    depth: np.ndarray | None
    timestamp: float
    index: int
    intrinsics: Intrinsics
    depth_scale: float = 0.001
    device_timestamp_ms: float | None = None
    camera: str = ""

    def __post_init__(self) -> None:
        if self.color.ndim != 3 or self.color.shape[2] != 3 or self.color.dtype != np.uint8:
            raise ValueError(f"Frame.color must be HxWx3 uint8, got {self.color.shape} {self.color.dtype}")
        if self.depth is not None and self.depth.shape != self.color.shape[:2]:
            raise ValueError(f"Frame.depth {self.depth.shape} must match colour {self.color.shape[:2]} (aligned)")

    def depth_m(self) -> np.ndarray | None:
        return None if self.depth is None else self.depth.astype(np.float32) * self.depth_scale


@runtime_checkable
class Camera(Protocol):
    name: str

    def connect(self) -> Camera: ...

    def close(self) -> None: ...

    def __enter__(self) -> Camera: ...

    def __exit__(self, *exc) -> None: ...

    def latest(self) -> Frame | None:
        """The most recent frame, or None before the first one; never blocks."""
        ...

    @property
    def intrinsics(self) -> Intrinsics: ...


@dataclass
class _Slot:
    frame: Frame | None = None
    error: BaseException | None = None
    frames: int = 0


class ThreadedCamera:
    """Base for cameras whose frames come from a blocking source read in one capture thread.

    Subclasses implement `_open()` (returns intrinsics), `_grab()` (blocks for the next frame; returns
    (color, depth, depth_scale, device_ts_ms) or None at the end of a finite source) and `_release()`.
    """

    def __init__(self, name: str, clock: Clock = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._slot = _Slot()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._intrinsics: Intrinsics | None = None
        self.finished = threading.Event()
        self._subscribers: list[Callable[[Frame], None]] = []

    # -- subclass hooks
    def _open(self) -> Intrinsics:
        raise NotImplementedError

    def _grab(self):
        raise NotImplementedError

    def _release(self) -> None:
        pass

    # -- lifecycle
    def connect(self) -> ThreadedCamera:
        if self._thread is not None:
            return self
        self._intrinsics = self._open()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # A grab returns within about a second (RealSense waits up to frame_timeout_ms = 1 s);
            # a thread stuck longer in a driver is left behind (daemon) so that exit stays bounded.
            self._thread.join(timeout=CLOSE_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("camera %s: capture thread did not stop within %.0f s", self.name, CLOSE_TIMEOUT_S)
            self._thread = None
        self._release()

    def __enter__(self) -> ThreadedCamera:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def intrinsics(self) -> Intrinsics:
        if self._intrinsics is None:
            raise CameraError(f"camera {self.name} is not connected: call connect() or use it in a `with` block")
        return self._intrinsics

    @property
    def error(self) -> BaseException | None:
        return self._slot.error

    @property
    def frames_received(self) -> int:
        return self._slot.frames

    def subscribe(self, callback: Callable[[Frame], None]) -> None:
        """Call `callback(frame)` from the capture thread for every frame (recording, tests)."""
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Callable[[Frame], None]) -> None:
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def latest(self) -> Frame | None:
        with self._lock:
            return self._slot.frame

    def wait_first_frame(self, timeout_s: float = 5.0) -> Frame:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            f = self.latest()
            if f is not None:
                return f
            if self._slot.error is not None:
                raise CameraError(f"camera {self.name} failed: {self._slot.error}") from self._slot.error
            time.sleep(0.005)
        raise CameraError(f"camera {self.name} delivered no frame within {timeout_s:.1f} s; check its cable/stream settings")

    def _run(self) -> None:
        index = 0
        try:
            while not self._stop.is_set():
                got = self._grab()
                if got is None:
                    break
                color, depth, scale, dev_ts = got
                frame = Frame(
                    color=color,
                    depth=depth,
                    timestamp=self._clock(),
                    index=index,
                    intrinsics=self._intrinsics,
                    depth_scale=scale,
                    device_timestamp_ms=dev_ts,
                    camera=self.name,
                )
                with self._lock:
                    self._slot.frame = frame
                    self._slot.frames += 1
                for cb in list(self._subscribers):
                    cb(frame)
                index += 1
        except BaseException as e:  # surfaced through .error and the loop's stale-frame watchdog
            log.error("camera %s: capture thread stopped: %s", self.name, e)
            self._slot.error = e
        finally:
            self.finished.set()


@dataclass
class CameraSet:
    """Several cameras opened and closed together; the first is the primary view."""

    cameras: list = field(default_factory=list)

    def __enter__(self) -> CameraSet:
        opened = []
        try:
            for c in self.cameras:
                c.connect()
                opened.append(c)
        except BaseException:
            for c in reversed(opened):
                c.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for c in reversed(self.cameras):
            c.close()
