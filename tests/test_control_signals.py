"""`molmoact-edge run` as a user's process manager treats it: SIGTERM (kill, systemd, docker stop)
and SIGKILL. A real run against franky-sim with a process worker; no child may outlive it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control_helpers import STATE_TIMEOUT_S, sim_available, wait_for, write_folder

pytestmark = [pytest.mark.sim, pytest.mark.fault]  # the fault-injection suite (README, safety)


def children(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc; a zombie counts as gone)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            if alive(k):
                out.add(k)
                todo.append(k)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def running(tmp_path, prelude: str | None = None, preexec_fn=None, worker: str = "process"):
    """`molmoact-edge run` on franky-sim with a process worker, once it sent its first command; killed
    afterwards if still running. `prelude`: Python run in that process before the CLI (fault injection)."""
    if not sim_available():
        pytest.skip("franky-sim / franky-control not installed: pip install molmoact-edge[robot,test]")
    write_folder(tmp_path / "frames", 10)
    log = tmp_path / "run.jsonl"
    # Output to a file, not a pipe: a child that outlives the run (the failure under test) would
    # hold a pipe open and hang the test instead of failing it.
    out = open(tmp_path / "out.txt", "w+")
    program = ["-m", "molmoact_edge"] if prelude is None else ["-c", prelude + "\n" + CLI]
    proc = subprocess.Popen(
        [sys.executable, *program, "run", "--camera", f"replay:{tmp_path / 'frames'}", "--robot", "sim",
         "--instruction", "move", "--policy", "scripted", "--worker", worker, "--duration", "60", "--log", str(log),
         "--state-timeout", str(STATE_TIMEOUT_S)],
        stdout=out, stderr=subprocess.STDOUT, text=True, preexec_fn=preexec_fn,
    )
    kids: set[int] = set()
    try:
        wait_for(lambda: any(r["kind"] == "command" for r in records(log)) or proc.poll() is not None, 60.0,
                 "the run to send its first command")
        assert proc.poll() is None, (tmp_path / "out.txt").read_text()
        kids = children(proc.pid)
        names = " | ".join(cmdline(k) for k in kids)
        # franky-sim (through sim_launch), the inference worker and multiprocessing's resource tracker
        assert "sim_launch" in names, names
        assert worker != "process" or ("resource_tracker" in names and "spawn_main" in names), names
        yield proc, log, kids
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for k in kids:  # whatever the test found still alive: not left behind on this machine
            if alive(k):
                os.kill(k, signal.SIGKILL)
        out.close()


CLI = "import sys; from molmoact_edge.main import main; raise SystemExit(main(sys.argv[1:]))"


@pytest.fixture
def started_run(tmp_path):
    with running(tmp_path) as started:
        yield started


def test_sigterm_takes_the_ctrl_c_stop_path_and_leaves_no_child(started_run):
    proc, log, kids = started_run
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 130, Path(log.parent / "out.txt").read_text()
    recs = records(log)
    stop = [r for r in recs if r["kind"] == "stop"][-1]
    assert stop["fault"] == "interrupted" and "SIGTERM" in stop["message"]
    assert recs[-1]["kind"] == "end" and recs[-1]["reason"] == "interrupted"
    assert not [r for r in recs if r["kind"] == "command" and r["t"] > stop["t"]]
    wait_for(lambda: not any(alive(k) for k in kids), 10.0, "every child process to exit")


def block_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])


def test_sigterm_stops_a_run_started_with_sigterm_blocked(tmp_path):
    """A blocked signal mask is inherited from the launcher (a runner, a shell, a parent's thread that
    blocked it); before, SIGTERM stayed pending and the run went on to its --duration. With a thread
    worker: starting multiprocessing's resource tracker happens to unblock SIGTERM as a side effect."""
    with running(tmp_path, preexec_fn=block_sigterm, worker="thread") as (proc, log, kids):
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.returncode == 130, (tmp_path / "out.txt").read_text()
        stop = [r for r in records(log) if r["kind"] == "stop"][-1]
        assert stop["fault"] == "interrupted" and "SIGTERM" in stop["message"]


def test_sigkill_of_the_run_leaves_no_child(started_run):
    proc, log, kids = started_run
    proc.kill()
    proc.wait(timeout=10)
    wait_for(lambda: not any(alive(k) for k in kids), 10.0,
             "every child to notice the dead parent: " + " | ".join(cmdline(k) for k in kids if alive(k)))


# A driver that blocks in C code while holding the GIL (as libfranka did in a Robot destructor, issue 9):
# here the arm's close() calls libc's sleep through ctypes.PyDLL, which keeps the GIL. The exit
# deadline is shortened to 3 s for the test.
HANG_IN_ARM_CLOSE = """
import ctypes
from molmoact_edge.hardware.franky_arm import FrankyArm
try:
    import molmoact_edge.stop_signals as stop_signals
    stop_signals.EXIT_DEADLINE_S = 3.0
except ImportError:  # the code before the deadline existed (to show this test failing there)
    pass
def close(self, _close=FrankyArm.close):
    ctypes.PyDLL(None).sleep(600)
    _close(self)
FrankyArm.close = close
"""


def test_sigterm_exit_has_a_deadline_even_when_a_driver_hangs_holding_the_gil(tmp_path):
    with running(tmp_path, HANG_IN_ARM_CLOSE) as (proc, log, kids):
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)  # before: hung for the whole 600 s
        out = (tmp_path / "out.txt").read_text()
        assert proc.returncode == 1, out
        assert "Timeout" in out and "most recent call first" in out, out  # every thread's stack, to find the hang
        assert "in close" in out, out
        recs = records(log)
        stop = [r for r in recs if r["kind"] == "stop"][-1]  # the arm was stopped before the cleanup hung
        assert stop["fault"] == "interrupted" and "SIGTERM" in stop["message"]
        assert not [r for r in recs if r["kind"] == "command" and r["t"] > stop["t"]]
        wait_for(lambda: not any(alive(k) for k in kids), 10.0,
                 "every child to exit after the deadline: " + " | ".join(cmdline(k) for k in kids if alive(k)))


# franky-sim started by a process that is gone before the child has set PR_SET_PDEATHSIG (a run
# killed, or interrupted and quickly gone, while it starts the simulator): the child's pre-exec step
# kills its parent and waits until it is gone. Before, that server outlived everything: the kernel's
# SIGKILL on the parent's death is armed by a prctl that came too late.
ORPHANED_SIM_START = """
import os, signal, sys, time
import molmoact_edge.hardware.sim as sim
def parent_dies_first(*args, _detach=sim._detach_and_die_with_parent):
    parent = os.getppid()
    open(sys.argv[1], "w").close()
    os.kill(parent, signal.SIGKILL)
    while os.getppid() == parent:
        time.sleep(0.01)
    _detach(*args)
sim._detach_and_die_with_parent = parent_dies_first
sim.SimServer().start()
"""


def test_a_simulator_whose_parent_died_while_starting_it_does_not_outlive_it(tmp_path):
    if not sim_available():
        pytest.skip("franky-sim / franky-control not installed: pip install molmoact-edge[robot,test]")
    marker = f"MOLMOACT_ORPHAN_TEST_{os.getpid()}_{tmp_path.name}"
    reached = tmp_path / "window-reached"
    subprocess.run([sys.executable, "-c", ORPHANED_SIM_START, str(reached)], env={**os.environ, marker: "1"},
                   timeout=60)

    def left() -> list[int]:
        found = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and marker.encode() in (p / "environ").read_bytes() and alive(int(p.name)):
                    found.append(int(p.name))
            except OSError:
                continue
        return found

    try:
        wait_for(reached.exists, 10.0, "the simulator's child to reach the window between fork and prctl")
        time.sleep(2.0)  # long enough for franky-sim to be running if the child went on
        assert left() == [], "franky-sim outlived the process that started it: " + " | ".join(map(cmdline, left()))
    finally:
        for k in left():
            os.kill(k, signal.SIGKILL)
