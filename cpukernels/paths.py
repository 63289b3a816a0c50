"""Where the kernels keep what they measure and build on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$SDACCEL_CACHE_DIR, else ~/.cache/sdaccel."""
    base = os.environ.get("SDACCEL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sdaccel")
    return Path(base)


def native_build_root() -> Path:
    """Where the native kernel's builds live: $SDACCEL_NATIVE_DIR, else the cache folder's `native/`."""
    explicit = os.environ.get("SDACCEL_NATIVE_DIR")
    return Path(explicit) if explicit else default_cache_dir() / "native"
