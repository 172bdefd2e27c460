"""franky-sim with the tabletop scene in its physics, publishing its state for the scene camera.

Why a process of our own rather than `franky-sim` itself: the objects must live in the simulator's
MuJoCo world (so that a later task can push them), and franky-sim's scene can only be extended
before it starts, in its own process. Rendering stays OUT of this process: a render (tens of ms on
a CPU) would stall the 1 kHz loop that libfranka's protocol expects. Instead the server writes its
`qpos` into a small shared file every `PUBLISH_EVERY` simulated milliseconds (a sequence-locked
record), and the camera (hardware/render_camera.py) renders the same MJCF, built from the same
seed, at that state in the control process.

    python -m molmoact_edge.hardware.scene_server --hostname 127.0.3.4 --seed 1000 --state /tmp/s.bin
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .scene import Scene, extend_mjcf

PUBLISH_EVERY = 10  # simulated ms between state records
READY_LINE = "Connect to the server"  # what SimServer waits for (franky-sim's own banner)


def build_simulator():
    """franky-sim's MuJoCo simulator (headless, not started)."""
    from franky_sim.mujoco_simulator import MujocoSimulator

    return MujocoSimulator(enable_visualization=False)


def scene_mjcf(scene: Scene) -> str:
    """The full MJCF of the scene as franky-sim builds it: the camera renders this same world."""
    sim = build_simulator()
    sim.add_robot()
    extend_mjcf(sim.worldbody, scene)
    return ET.tostring(sim.scene, encoding="unicode")


class StateFile:
    """A sequence-locked float64 record [seq, nq, qpos...] in a file both processes map.

    The writer makes `seq` odd while it writes and even when done; a reader retries until it sees
    the same even `seq` before and after copying, so it never returns a half-written state."""

    def __init__(self, path: str | os.PathLike, nq: int, create: bool) -> None:
        self.path = Path(path)
        self.nq = nq
        if create:
            np.zeros(2 + nq).tofile(self.path)
        self._mm = np.memmap(self.path, dtype=np.float64, mode="r+" if create else "r", shape=(2 + nq,))
        if create:
            self._mm[1] = nq
            self._mm.flush()

    @classmethod
    def open_reader(cls, path: str | os.PathLike) -> StateFile:
        n = Path(path).stat().st_size // 8 - 2
        if n <= 0:
            raise ValueError(f"{path} is not a scene state file (size {Path(path).stat().st_size} bytes)")
        return cls(path, n, create=False)

    def write(self, qpos: np.ndarray) -> None:
        self._mm[0] += 1
        self._mm[2:] = qpos
        self._mm[0] += 1

    def read(self, tries: int = 100) -> np.ndarray | None:
        """The newest complete state, or None before the first one."""
        for _ in range(tries):
            s0 = self._mm[0]
            q = np.array(self._mm[2:])
            if s0 == self._mm[0] and int(s0) % 2 == 0:
                return q if s0 > 0 else None
            time.sleep(0.0002)
        return None


def serve(host: str, seed: int, state_path: str, n_objects: int) -> None:
    from franky_sim import SimulationServer

    from .sim_launch import install

    install()  # franky-sim in lockstep with libfranka, reporting the commanded twist as a Franka does
    scene = Scene.from_seed(seed, n_objects)
    sim = build_simulator()
    with sim:
        sim.add_robot()
        extend_mjcf(sim.worldbody, scene)
        with SimulationServer(sim, hostname_candidates=[host]) as server:
            state = StateFile(state_path, sim.model.nq, create=True)
            state.write(sim.data.qpos)
            print(f"{READY_LINE} using '{host}' as the robot IP address ({scene.instruction})", flush=True)
            server.running = True
            tick = 0
            while server.running:
                server.run_once()
                tick += 1
                if tick % PUBLISH_EVERY == 0:
                    state.write(sim.data.qpos)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hostname", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--state", required=True, help="file the server publishes its qpos to")
    p.add_argument("--objects", type=int, default=3)
    args = p.parse_args(argv)
    try:
        serve(args.hostname, args.seed, args.state, args.objects)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
