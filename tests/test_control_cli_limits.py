"""`molmoact-edge run`'s flags for the limits that follow the measured arm (--max-lead, --max-turn-lead,
--max-tilt, --box-margin) and for the lost-link watchdog (--state-timeout): bad values are usage errors, and each value reaches the safety layer of a
real run against franky-sim (read back from the run log, audited independently)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from control_helpers import STATE_TIMEOUT_S, check_commands, sim_available, write_folder

from molmoact_edge.runtime.control.safety import SafetyConfig

USAGE = 2


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "molmoact_edge", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("flag,value,says", [
    ("--max-lead", "nan", "[0.005, 0.5] metres"),
    ("--max-turn-lead", "0.5", "[1, 180] degrees"),
    ("--max-tilt", "270", "[1, 180] degrees"),
    ("--box-margin", "5cm", "expected a number of metres"),
    ("--state-timeout", "0", "[0.005, 5] seconds"),
])
def test_bad_limit_values_are_one_line_usage_errors(flag, value, says):
    proc = cli("run", "--camera", "replay:x", "--robot", "sim", "--instruction", "go", flag, value)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.returncode == USAGE, proc.stderr
    assert flag in errors[0] and says in errors[0]


def test_limit_defaults_are_shown_and_match_the_safety_config():
    text = " ".join(cli("run", "--help").stdout.split())
    d = SafetyConfig()
    assert "--max-lead M most the commanded position" in text and f"(default: {d.max_lead_m})" in text
    for flag, rad in (("--max-turn-lead", d.max_lead_rad), ("--max-tilt", d.max_tilt_rad)):
        shown = float(text.split(flag + " DEG")[-1].split("(default: ")[1].split(")")[0])
        assert shown == pytest.approx(math.degrees(rad), abs=0.01), flag
    assert f"(default: {d.box_margin_m})" in text.split("--box-margin M")[-1]


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@pytest.fixture
def run_sim(tmp_path):
    if not sim_available():
        pytest.skip("franky-sim / franky-control not installed: pip install molmoact-edge[robot,test]")
    write_folder(tmp_path / "frames", 10)

    def run(name: str, *flags: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
        log = tmp_path / f"{name}.jsonl"
        proc = cli("run", "--camera", f"replay:{tmp_path / 'frames'}", "--robot", "sim", "--instruction", "move",
                   "--policy", "scripted", "--worker", "thread", "--dynamics", "0.2", "--duration", "3",
                   "--state-timeout", STATE_TIMEOUT_S, "--log", log, *flags)
        return proc, records(log)
    return run


def lead_clamps(recs: list[dict]) -> int:
    return sum("lead_clamp" in r["interventions"] for r in recs if r["kind"] == "command")


@pytest.mark.sim
@pytest.mark.fault
def test_run_flags_set_the_lead_bound_and_the_box_margin(run_sim):
    # The scripted 6 cm move: franky-sim's planner lags the command by centimetres, so a 5 mm
    # --max-lead holds the command back to 5 mm, where the default lets it lead by more.
    proc, tight = run_sim("tight", "--scripted-offset", "0.06,0,0", "--max-lead", "0.005", "--max-turn-lead", "10",
                          "--max-tilt", "30")
    assert proc.returncode == 0, proc.stderr
    limits = tight[0]["safety"]  # what the run's safety layer was built with
    assert limits["max_lead_m"] == 0.005 and limits["box_margin_m"] == SafetyConfig().box_margin_m
    assert limits["max_lead_rad"] == pytest.approx(math.radians(10)) and limits["max_tilt_rad"] == pytest.approx(math.radians(30))
    assert lead_clamps(tight) > 0
    audit = check_commands(tight, SafetyConfig(dynamics_factor=0.2, max_lead_m=0.005), 1 / 50)
    assert audit["lead_m"] <= 0.005 + 1e-5
    proc, default = run_sim("default", "--scripted-offset", "0.06,0,0")
    assert proc.returncode == 0, proc.stderr
    assert check_commands(default, SafetyConfig(dynamics_factor=0.2), 1 / 50)["lead_m"] > 0.005
    # A box whose +x face lies 3 cm short of the start pose: within the default 5 cm margin the run
    # walks back into it; a 2 cm --box-margin stops the run before any command.
    start = np.asarray(next(r for r in default if r["kind"] == "anchor")["pose"]["p"])
    box = ",".join(f"{v:.4f}" for v in (0.1, -0.5, 0.0, start[0] - 0.03, 0.5, 0.8))
    proc, stopped = run_sim("margin", "--workspace", box, "--box-margin", "0.02")
    end = stopped[-1]
    assert end["kind"] == "end" and end["fault"] == "workspace_exit" and end["commands"] == 0, proc.stderr
    assert "margin 20 mm" in [r for r in stopped if r["kind"] == "stop"][-1]["message"]
    proc, walked = run_sim("walk", "--workspace", box, "--scripted-offset", "0,0,0")
    assert walked[-1]["fault"] is None and walked[-1]["interventions"].get("return_to_box", 0) > 0, proc.stderr
