"""`molmoact-edge run` as a user's process manager treats it: SIGTERM (kill, systemd, docker stop)
and SIGKILL. A real run against franky-sim with a process worker; no child may outlive it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from control_helpers import sim_available, wait_for, write_folder

pytestmark = pytest.mark.sim


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


@pytest.fixture
def started_run(tmp_path):
    if not sim_available():
        pytest.skip("franky-sim / franky-control not installed: pip install molmoact-edge[robot,test]")
    write_folder(tmp_path / "frames", 10)
    log = tmp_path / "run.jsonl"
    # Output to a file, not a pipe: a child that outlives the run (the failure under test) would
    # hold a pipe open and hang the test instead of failing it.
    out = open(tmp_path / "out.txt", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "molmoact_edge", "run", "--camera", f"replay:{tmp_path / 'frames'}", "--robot", "sim",
         "--instruction", "move", "--policy", "scripted", "--worker", "process", "--duration", "60", "--log", str(log)],
        stdout=out, stderr=subprocess.STDOUT, text=True,
    )
    kids: set[int] = set()
    try:
        wait_for(lambda: any(r["kind"] == "command" for r in records(log)) or proc.poll() is not None, 60.0,
                 "the run to send its first command")
        assert proc.poll() is None, (tmp_path / "out.txt").read_text()
        kids = children(proc.pid)
        names = " | ".join(cmdline(k) for k in kids)
        # franky-sim (through sim_launch), the inference worker and multiprocessing's resource tracker
        assert "sim_launch" in names and "resource_tracker" in names and "spawn_main" in names, names
        yield proc, log, kids
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for k in kids:  # whatever the test found still alive: not left behind on this machine
            if alive(k):
                os.kill(k, signal.SIGKILL)
        out.close()


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


def test_sigkill_of_the_run_leaves_no_child(started_run):
    proc, log, kids = started_run
    proc.kill()
    proc.wait(timeout=10)
    wait_for(lambda: not any(alive(k) for k in kids), 10.0,
             "every child to notice the dead parent: " + " | ".join(cmdline(k) for k in kids if alive(k)))
