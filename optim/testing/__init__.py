"""Random-weight models in the real layouts, and checkpoint writers, for tests and benchmarks.

The engine never imports this package; `enable_synthetic()` lets `synthetic:<family>` model paths and
the `synthetic` VAE load. Importing it is cheap: torch loads when a builder is first used.
"""

from __future__ import annotations

import importlib

from .synthetic import enable_synthetic

_LAZY = {"build_components": "random_weights", "build_pipeline": "random_weights",
         "write_checkpoint": "random_weights", "write_single_file": "random_weights"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["build_components", "build_pipeline", "enable_synthetic", "write_checkpoint", "write_single_file"]
