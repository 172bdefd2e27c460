"""The robot side stays torch-free and never reaches into export/quantization (DESIGN.md)."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "molmoact_edge.hardware.camera", "molmoact_edge.hardware.realsense", "molmoact_edge.hardware.replay",
    "molmoact_edge.hardware.recording", "molmoact_edge.hardware.arm", "molmoact_edge.hardware.franky_arm",
    "molmoact_edge.hardware.sim", "molmoact_edge.runtime.control.loop", "molmoact_edge.runtime.control.worker",
    "molmoact_edge.runtime.control.executor", "molmoact_edge.runtime.control.safety", "molmoact_edge.runtime.control.convention",
    "molmoact_edge.runtime.control.policy", "molmoact_edge.run_cmd", "molmoact_edge.record_cmd",
]


def test_robot_modules_import_neither_torch_nor_export_nor_sdks():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in MODULES)
        + "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'molmoact_edge.export', "
        "'molmoact_edge.quantization'))]\n"
        # Hardware SDKs load lazily inside their adapters, only when a device is opened.
        + "bad += [m for m in ('franky', 'pyrealsense2', 'franky_sim', 'mujoco') if m in sys.modules]\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported at module load: {out.stdout.strip()}"
