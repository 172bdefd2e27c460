"""Lazy imports of hardware SDKs with an error that names the fix."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependencyError(ImportError):
    """A hardware SDK is not installed; the message names the extra that provides it."""


def require(module: str, distribution: str, extra: str = "robot") -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if not isinstance(e, ModuleNotFoundError) and "cannot open shared object file" in str(e):
            # installed, but a system library it loads is not (pyrealsense2 needs libusb-1.0-0)
            raise MissingDependencyError(
                f"`{module}` is installed but cannot load a system library ({e}); on Debian/Ubuntu install "
                "the package that provides it, e.g. `apt-get install -y libusb-1.0-0` for pyrealsense2."
            ) from e
        raise MissingDependencyError(
            f"`{module}` could not be imported ({e}). It comes from the PyPI package "
            f"`{distribution}`: install it with `pip install molmoact-edge[{extra}]` "
            f"(or `pip install {distribution}`)."
        ) from e
