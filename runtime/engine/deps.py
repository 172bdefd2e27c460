"""The engine's optional inference libraries (onnxruntime today; TensorRT and a CUDA binding next),
imported only when a backend opens, so that loading a bundle's configs never needs them."""

from __future__ import annotations

import importlib
from types import ModuleType


class BackendUnavailable(ImportError):
    """An inference library is not installed; the message says which package and extra provide it."""


def import_backend(module: str, package: str, extra: str = "robot") -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = f"pip install 'molmoact-edge[{extra}]' (or pip install {package})"
        raise BackendUnavailable(f"the {module} backend is not available ({e}): {hint}") from e
