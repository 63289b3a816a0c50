"""Offload: keep weights out of the working memory while they are not computing.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour and stores.py (where idle weights wait).
"""

from __future__ import annotations

from .config import OffloadConfig


def apply_offload(pipe, config: OffloadConfig | None = None, *, device=None, family=None):
    """Apply this optimization to a diffusers pipeline; `handle.remove()` restores it exactly.

    `device` defaults to where the UNet's weights are and `family` (a name such as "sd15") to the one
    the pipeline's components match.

    >>> from sdaccel.optim.testing import build_pipeline
    >>> from sdaccel.optim.units.offload import OffloadConfig, apply_offload
    >>> pipe = build_pipeline("sd15", tiny=True)
    >>> handle = apply_offload(pipe, OffloadConfig(mode="staged"))
    >>> handle.name
    'offload'
    >>> handle.remove()
    """
    from ...core.apply import apply

    return apply(pipe, config if config is not None else OffloadConfig(), device=device, family=family)


__all__ = ["OffloadConfig", "apply_offload"]
