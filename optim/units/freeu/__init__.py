"""FreeU (Si et al., 2023, arXiv 2309.11497): re-weight the UNet's backbone and skip features.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour.
"""

from __future__ import annotations

from .. import public_apply
from .config import FreeUConfig

apply_freeu = public_apply(FreeUConfig, 'FreeUConfig()')

__all__ = ["FreeUConfig", "apply_freeu"]
