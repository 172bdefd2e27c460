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
        raise MissingDependencyError(
            f"`{module}` could not be imported ({e}). It comes from the PyPI package "
            f"`{distribution}`: install it with `pip install molmoact-edge[{extra}]` "
            f"(or `pip install {distribution}`)."
        ) from e
