"""franky-sim as a managed subprocess: a simulated Franka (MuJoCo) speaking libfranka's protocol.

franky-sim binds the FCI port (1337) and the gripper port (1338) on a loopback address, so several
servers can run side by side on 127.x.y.z. `SimServer` picks a free address, starts the server,
waits until it accepts connections and kills it on exit. It is test-only equipment
(`pip install molmoact-edge[sim]` or `pip install franky-sim`).
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from .franky_arm import FCI_PORT


class SimError(RuntimeError):
    pass


def _detach_and_die_with_parent(parent: int) -> None:
    # Own process group (so close() can signal the whole server), and SIGKILL when the parent dies
    # (Linux PR_SET_PDEATHSIG), so a killed test run never leaves a simulator behind.
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass
    # A parent that died between the fork and the prctl (killed, or interrupted while starting the
    # server and gone at once) never sends that SIGKILL: the server would outlive it.
    if os.getppid() != parent:
        os._exit(1)


def free_loopback_host() -> str:
    for _ in range(200):
        host = f"127.0.{random.randint(1, 250)}.{random.randint(2, 250)}"
        ok = True
        for port in (FCI_PORT, FCI_PORT + 1):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
        if ok:
            return host
    raise SimError("no free loopback address for franky-sim (ports 1337/1338 taken everywhere tried)")


def franky_sim_command() -> list[str]:
    """franky-sim's server through `sim_launch`, which keeps it in step with libfranka and makes it report
    the commanded motion as a Franka does."""
    if importlib.util.find_spec("franky_sim") is None:
        raise SimError("franky-sim is not installed: `pip install molmoact-edge[sim]` (or `pip install franky-sim`)")
    return [sys.executable, "-m", "molmoact_edge.hardware.sim_launch"]


class SimServer:
    """`with SimServer() as sim: FrankyArm(FrankyConfig(sim.host))`."""

    def __init__(self, host: str | None = None, simulator: str = "mujoco", start_timeout_s: float = 60.0) -> None:
        self.host = host or free_loopback_host()
        self.simulator = simulator
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def log_text(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def command(self) -> list[str]:
        """The server's command line (a subclass may run a franky-sim with its own scene)."""
        return franky_sim_command() + ["--simulator", self.simulator, "--hostname", self.host]

    def start(self) -> SimServer:
        self._log = tempfile.NamedTemporaryFile("w+", prefix="franky-sim-", suffix=".log", delete=False)
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # headless: MuJoCo loads no GL unless rendering
        try:
            self.proc = subprocess.Popen(
                self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                preexec_fn=partial(_detach_and_die_with_parent, os.getpid()),
            )
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SimError(f"franky-sim exited with {self.proc.returncode} during start-up:\n{self.log_text[-2000:]}")
                if "Connect to the server" in self.log_text:
                    return self
                time.sleep(0.1)
            raise SimError(f"franky-sim did not come up on {self.host} within {self.start_timeout_s:.0f} s:\n{self.log_text[-2000:]}")
        except BaseException:  # a start-up failure, Ctrl-C or SIGTERM: `with` will not call close()
            self.close()
            raise

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass  # gone meanwhile

    def _ended_within(self, timeout_s: float) -> bool:
        try:
            self.proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self, timeout_s: float = 1.0) -> None:
        """SIGKILL, as a crashed server would vanish (used by the fault-injection tests too)."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self._ended_within(timeout_s)

    def close(self, timeout_s: float = 2.0) -> None:
        """End the server within about `timeout_s`: SIGTERM, then SIGKILL for the rest of the time.

        A server that outlives both is not waited for: it gets SIGKILL when this process exits
        (PR_SET_PDEATHSIG), so close() never blocks."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            if not self._ended_within(timeout_s / 2):
                self.kill(timeout_s / 2)
        if self._log is not None:
            self._log.close()
            os.unlink(self._log.name)
            self._log = None

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
