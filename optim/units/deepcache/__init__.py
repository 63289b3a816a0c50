"""DeepCache (Ma et al., 2023, arXiv 2312.00858): reuse the UNet's deep features between steps.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour,
and unet_layers.py (the UNet run layer by layer).
"""

from __future__ import annotations

from .config import DeepCacheConfig


def apply_deepcache(pipe, config: DeepCacheConfig | None = None, *, device=None, family=None):
    """Apply this optimization to a diffusers pipeline; `handle.remove()` restores it exactly.

    `device` defaults to where the UNet's weights are and `family` (a name such as "sd15") to the one
    the pipeline's components match.

    >>> from sdaccel.optim.testing import build_pipeline
    >>> from sdaccel.optim.units.deepcache import DeepCacheConfig, apply_deepcache
    >>> pipe = build_pipeline("sd15", tiny=True)
    >>> handle = apply_deepcache(pipe, DeepCacheConfig(cache_interval=3))
    >>> handle.name
    'deepcache'
    >>> handle.remove()
    """
    from ...core.apply import apply

    return apply(pipe, config if config is not None else DeepCacheConfig(), device=device, family=family)


__all__ = ["DeepCacheConfig", "apply_deepcache"]
