"""DeepCache (Ma et al., 2023, arXiv 2312.00858): reuse the UNet's deep features between steps.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour,
and unet_layers.py (the UNet run layer by layer).
"""

from __future__ import annotations

from .. import public_apply
from .config import DeepCacheConfig

apply_deepcache = public_apply(DeepCacheConfig, 'DeepCacheConfig(cache_interval=3)')

__all__ = ["DeepCacheConfig", "apply_deepcache"]
