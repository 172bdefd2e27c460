"""The rendered scene camera and the scene simulator it watches.

`SceneSim` runs franky-sim with a seeded tabletop (hardware/scene_server.py) as a managed
subprocess, like `SimServer`; `RenderCamera` renders that world from the fixed scene camera at the
simulator's published state, RGB plus depth aligned to it, behind the same Camera protocol as
RealSense and replay. Rendering is headless: MuJoCo's EGL (Mesa's software driver on a CPU machine,
packages libegl1 libegl-mesa0 libgl1-mesa-dri) unless MUJOCO_GL says otherwise.

    with SceneSim(seed=1000) as sim, RenderCamera(sim) as cam, FrankyArm(FrankyConfig(sim.host)) as arm:
        ...
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .camera import CameraError, Clock, Intrinsics, ThreadedCamera
from .scene import Scene, camera_intrinsics
from .sim import SimServer


class SceneSim(SimServer):
    """franky-sim with `Scene.from_seed(seed)` in its physics; publishes its state to `state_path`."""

    def __init__(self, seed: int, n_objects: int = 3, host: str | None = None, start_timeout_s: float = 60.0) -> None:
        super().__init__(host=host, start_timeout_s=start_timeout_s)
        self.scene = Scene.from_seed(seed, n_objects)
        self._state_dir = tempfile.mkdtemp(prefix="molmoact-scene-")
        self.state_path = str(Path(self._state_dir) / "qpos.bin")

    def command(self) -> list[str]:
        return [sys.executable, "-m", "molmoact_edge.hardware.scene_server", "--hostname", self.host,
                "--seed", str(self.scene.seed), "--state", self.state_path, "--objects", str(len(self.scene.objects))]

    def close(self) -> None:
        super().close()
        Path(self.state_path).unlink(missing_ok=True)
        try:
            os.rmdir(self._state_dir)
        except OSError:
            pass


def _gl_backend() -> bool:
    """Choose headless EGL unless MUJOCO_GL says otherwise; False when it is too late to choose."""
    # MuJoCo picks its GL platform when it is first imported: this runs when this module is imported,
    # so import it before anything imports mujoco.
    too_late = "mujoco" in sys.modules and "MUJOCO_GL" not in os.environ
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    return not too_late


# False: mujoco was imported first without MUJOCO_GL and took GLFW, which needs a display. Rendering
# without one then fails, and after a few tries GLFW aborts the whole process (seen in a test run).
_HEADLESS_CHOSEN = _gl_backend()


class SceneRenderer:
    """Renders one scene at a given qpos: RGB (uint8) and depth (metres) from the scene camera."""

    def __init__(self, scene: Scene) -> None:
        if not _HEADLESS_CHOSEN and not os.environ.get("DISPLAY"):
            raise CameraError(
                "mujoco was imported before molmoact_edge.hardware.render_camera, without MUJOCO_GL, so it chose "
                "GLFW, which needs a display; set MUJOCO_GL=egl in the environment or import "
                "molmoact_edge.hardware.render_camera before mujoco")
        import mujoco

        from .scene_server import scene_mjcf

        self.intrinsics: Intrinsics = camera_intrinsics()
        self._mj = mujoco
        self.model = mujoco.MjModel.from_xml_string(scene_mjcf(scene))
        # Software GL: no shadow maps and no multisampling (they made a frame cost ~0.1 s of CPU,
        # which the simulator and the model on the same cores cannot spare).
        self.model.vis.quality.offsamples = 0
        self.model.vis.quality.shadowsize = 0
        self.model.light_castshadow[:] = 0
        self.data = mujoco.MjData(self.model)
        self.model.vis.global_.offwidth = max(self.model.vis.global_.offwidth, self.intrinsics.width)
        self.model.vis.global_.offheight = max(self.model.vis.global_.offheight, self.intrinsics.height)
        try:
            self._rgb = mujoco.Renderer(self.model, self.intrinsics.height, self.intrinsics.width)
            self._depth = mujoco.Renderer(self.model, self.intrinsics.height, self.intrinsics.width)
        except Exception as e:  # no GL: name the packages
            raise CameraError(
                f"MuJoCo cannot render headless (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): {e}. Install Mesa's EGL: "
                "`apt-get install -y libegl1 libegl-mesa0 libgl1-mesa-dri` (or set MUJOCO_GL=osmesa with libosmesa6); "
                "if mujoco was imported before molmoact_edge.hardware.render_camera, set MUJOCO_GL=egl in the environment"
            ) from e
        self._depth.enable_depth_rendering()
        self._cam = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, "scene_cam")

    def render(self, qpos: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if qpos is not None:
            self.data.qpos[:] = qpos
        self._mj.mj_forward(self.model, self.data)
        self._rgb.update_scene(self.data, camera=self._cam)
        self._depth.update_scene(self.data, camera=self._cam)
        return self._rgb.render().copy(), self._depth.render().copy()

    def close(self) -> None:
        self._rgb.close()
        self._depth.close()


class RenderCamera(ThreadedCamera):
    """The scene camera over a running `SceneSim`, at `fps` frames per second (its own thread)."""

    def __init__(self, sim: SceneSim, fps: float = 10.0, name: str = "scene", clock: Clock = time.monotonic) -> None:
        super().__init__(name, clock)
        if not (0.5 <= fps <= 60):
            raise ValueError(f"RenderCamera fps must be in [0.5, 60], got {fps}")
        self.sim = sim
        self.period = 1.0 / fps
        self._renderer: SceneRenderer | None = None
        self._state = None
        self._next = 0.0

    def _open(self) -> Intrinsics:
        from .scene_server import StateFile

        if not Path(self.sim.state_path).exists():
            raise CameraError(f"scene camera: {self.sim.state_path} does not exist; start the SceneSim first")
        self._state = StateFile.open_reader(self.sim.state_path)
        return camera_intrinsics()

    def _grab(self):
        # The renderer is made in the capture thread: a GL context belongs to the thread that made it.
        if self._renderer is None:
            self._renderer = SceneRenderer(self.sim.scene)
            if self._renderer.model.nq != self._state.nq:
                raise CameraError(f"scene camera: the simulator publishes {self._state.nq} joint positions, the "
                                  f"rendered scene has {self._renderer.model.nq}: both must be built from one seed")
        wait = self._next - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._next = max(self._next + self.period, time.monotonic())
        qpos = self._state.read()
        rgb, depth_m = self._renderer.render(qpos)
        depth = np.clip(np.nan_to_num(depth_m) * 1000.0, 0, 65535).astype(np.uint16)
        return rgb, depth, 0.001, None

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            # A GL context can only be made current (and so freed) in the thread that created it.
            if self._renderer is not None:
                self._renderer.close()
                self._renderer = None
