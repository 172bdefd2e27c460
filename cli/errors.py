"""The command line's one error path: every expected failure becomes one `error:` line and a status.

Exit status: 0 success; 1 a failure at run time (a missing or corrupt file, a bad bundle, a device,
a missing dependency); 2 a usage error (a bad flag or value, argparse's own errors included);
130 interrupted by Ctrl-C. An exception that is none of these is a bug in this program and keeps
its traceback.
"""

from __future__ import annotations

import os
import sys

FAILURE, USAGE, INTERRUPTED = 1, 2, 130

EXIT_STATUS_HELP = ("exit status: 0 success, 1 failure at run time (missing or corrupt file, bad bundle, "
                    "device, missing dependency), 2 usage error (bad flag or value), 130 interrupted")


class UsageError(Exception):
    """A flag or value the command cannot use (exit 2)."""


class CommandError(Exception):
    """A failure at run time, already explained in the message (exit 1)."""


class Interrupted(Exception):
    """Ctrl-C, with what the interrupted command left behind (exit 130)."""


# Library errors that mean "the input or the machine is not what it must be", not "this program is
# wrong". Named, not imported: checking them must not import torch or a hardware SDK, and a class keeps
# its meaning when it moves between modules of the package.
EXPECTED = frozenset({
    "ConfigError", "BundleError", "OnnxProtoError", "ImageError", "InputError", "GrammarError",
    "BackendUnavailable", "NonFiniteError", "CheckpointError", "CalibrationError",  # model, bundle, inputs
    "PolicyUnavailable", "NoActionError",  # control side
    "CameraError", "ArmError", "SimError", "MissingDependencyError", "RecordingExistsError",  # hardware
})

TORCH = "pip install torch==2.13.0 'molmoact-edge[export]'  (README: 'Installing torch')"
# Third-party module -> how to install it. The robot-only install (`molmoact-edge[robot]`) has no torch.
INSTALL = {
    "torch": TORCH,
    "safetensors": TORCH,
    "onnx": TORCH,
    "onnxscript": TORCH,
    "transformers": "pip install 'molmoact-edge[bench]'",
    "matplotlib": "pip install 'molmoact-edge[study]'",
    "onnxruntime": "pip install 'molmoact-edge[robot]'",
    "pyrealsense2": "pip install 'molmoact-edge[robot]'",
    "franky": "pip install 'molmoact-edge[robot]'",
    "franky_sim": "pip install 'molmoact-edge[sim]'",
}
# Shared library (as the loader names it) -> Debian/Ubuntu package.
APT = {"libusb-1.0": "libusb-1.0-0", "libGL.so": "libgl1", "libEGL": "libegl1"}


def _expected_class(e: BaseException) -> bool:
    return any(c.__name__ in EXPECTED and c.__module__.startswith("molmoact_edge.") for c in type(e).__mro__)


def _missing_system_library(e: ImportError) -> str | None:
    text = str(e)
    if "cannot open shared object file" not in text:
        return None
    lib = text.split(":", 1)[0].strip()
    pkg = next((p for k, p in APT.items() if k in lib), None)
    fix = f"apt-get install -y {pkg}" if pkg else "install the system package that provides it"
    return f"the system library {lib} is missing ({e.name or 'a module'} needs it): {fix}"


def describe(e: BaseException, command: str | None) -> tuple[int, str] | None:
    """(exit status, message) for an expected failure; None for a bug (which keeps its traceback).
    MOLMOACT_EDGE_TRACEBACK=1 shows the traceback of every failure (for a bug report)."""
    if os.environ.get("MOLMOACT_EDGE_TRACEBACK") == "1" and not isinstance(e, UsageError):
        return None
    what = f"`molmoact-edge {command}`" if command else "molmoact-edge"
    if isinstance(e, KeyboardInterrupt):
        return INTERRUPTED, "interrupted (Ctrl-C)"
    if isinstance(e, Interrupted):
        return INTERRUPTED, str(e)
    if isinstance(e, UsageError):
        return USAGE, str(e) + (f" (see `molmoact-edge {command} --help`)" if command else "")
    if isinstance(e, CommandError) or _expected_class(e):
        return FAILURE, str(e)
    if isinstance(e, ImportError):
        lib = _missing_system_library(e)
        if lib:
            return FAILURE, lib
        root = (e.name or "").split(".")[0]
        if isinstance(e, ModuleNotFoundError) and root in INSTALL:
            return FAILURE, f"{what} needs the Python package `{root}`, which is not installed: {INSTALL[root]}"
        return None
    if isinstance(e, OSError) and e.filename is not None:
        return FAILURE, f"{e.strerror or e}: {e.filename}"
    if _raised_by_onnxruntime(e):
        return FAILURE, (f"onnxruntime could not run the bundle: {e}. A bundle whose files or manifest were "
                         "edited or damaged must be exported again (molmoact-edge export --force)")
    return None


def _raised_by_onnxruntime(e: BaseException) -> bool:
    """onnxruntime reports a graph it cannot run (wrong input dtype or shape: a bundle that disagrees
    with itself) as a RuntimeError of its own or a plain one raised from inside its package."""
    if type(e).__module__.startswith("onnxruntime"):
        return True
    if type(e) is not RuntimeError or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.sep}onnxruntime{os.sep}" in tb.tb_frame.f_code.co_filename


def report(status: int, message: str) -> int:
    """Print the message as one `error:` line (further lines of detail indented below it)."""
    first, *rest = message.strip().splitlines() or [""]
    print(f"error: {first}", file=sys.stderr)
    for line in rest:
        print(f"    {line.strip()}", file=sys.stderr)
    return status
