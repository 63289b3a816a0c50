"""Offload: keep weights out of the working memory while they are not computing.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour and stores.py (where idle weights wait).
"""

from __future__ import annotations

from .. import public_apply
from .config import OffloadConfig

apply_offload = public_apply(OffloadConfig, 'OffloadConfig(mode="staged")')

__all__ = ["OffloadConfig", "apply_offload"]
