"""VAE variants: the fp16-fix VAE, the Tiny VAE (TAESD / TAESDXL), and sliced / tiled decoding.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour and files.py (reading VAE weight files).
"""

from __future__ import annotations

from .. import public_apply
from .config import VaeConfig

apply_vae = public_apply(VaeConfig, 'VaeConfig(slicing=True)')

__all__ = ["VaeConfig", "apply_vae"]
