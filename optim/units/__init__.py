"""Built-in optimizations, one folder each: `config.py` (plain data), `unit.py` (behaviour), helpers beside.

Importing this package does nothing; `load_configs()` registers the config classes (no torch) and
`load_units()` the behaviour, in this canonical registration order.
"""

from __future__ import annotations

import importlib

BUILTIN = ("precision", "attention", "channels_last", "winograd", "deepcache", "freeu", "vae", "offload", "compile")


def load_configs() -> None:
    """Register every built-in config class (cheap: no torch)."""
    for name in BUILTIN:
        importlib.import_module(f".{name}.config", __name__)


def load_units() -> None:
    """Register every built-in unit (imports torch and the units' helpers)."""
    load_configs()
    for name in BUILTIN:
        importlib.import_module(f".{name}.unit", __name__)
