"""The README's main command works from the repository alone: no fixtures, no network."""

import json
import subprocess
import sys

import pytest

# The demo writes a checkpoint and exports it: the torch side, absent on a robot install.
pytest.importorskip("torch", reason="the demo exports a bundle: pip install '.[export]' (absent on a robot install)")


def test_demo_runs_offline_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "molmoact_edge", "demo", "--out", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "NO_PROXY": "*",
                               "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["parse_errors"] == [] and len(d["depth"]) == 100 and len(d["actions"]) == 1
    assert d["prompt_tokens"] > 700  # a 640x480 scene: global view + 2x2 tiles
    assert (tmp_path / d["bundle"].split("/")[-1] / "manifest.json").exists()
