"""Precision: the dtype of each component, and the device the weights live on.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour.
"""

from __future__ import annotations

from .. import public_apply
from .config import PrecisionConfig

apply_precision = public_apply(PrecisionConfig, 'PrecisionConfig(unet="fp32")')

__all__ = ["PrecisionConfig", "apply_precision"]
