"""The dependency direction of DESIGN.md: runtime/ and hardware/ never import torch, export or quantization."""

import subprocess
import sys

CHECK = r"""
import importlib, pkgutil, sys
import molmoact_edge.runtime, molmoact_edge.hardware
names = []
for pkg in (molmoact_edge.runtime, molmoact_edge.hardware):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        names.append(m.name)
        importlib.import_module(m.name)
bad = sorted(k for k in sys.modules if k == "torch" or k.startswith(("torch.", "onnx.", "onnxscript",
             "molmoact_edge.export", "molmoact_edge.quantization")) or k == "onnx")
assert not bad, f"runtime/hardware imported {bad[:5]}"
print(len(names))
"""


def test_runtime_and_hardware_import_without_torch():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 5  # the walk really found the runtime modules


def test_runtime_import_works_with_torch_blocked():
    """Simulates a robot install without torch: any torch import inside the runtime would fail."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import molmoact_edge.runtime.engine.pipeline, molmoact_edge.runtime.engine.generate, molmoact_edge.runtime.engine.prompt\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
