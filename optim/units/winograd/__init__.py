"""Winograd convolution for the 3x3 stride-1 convolutions of the UNet and the VAE.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour.
"""

from __future__ import annotations

from .. import public_apply
from .config import WinogradConfig

apply_winograd = public_apply(WinogradConfig, 'WinogradConfig(tile="f2", fused_transforms=False, vae=False)')

__all__ = ["WinogradConfig", "apply_winograd"]
