"""Precision: the dtype of each component, and the device the weights live on.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour.
"""

from __future__ import annotations

from .config import PrecisionConfig


def apply_precision(pipe, config: PrecisionConfig | None = None, *, device=None, family=None):
    """Apply this optimization to a diffusers pipeline; `handle.remove()` restores it exactly.

    `device` defaults to where the UNet's weights are and `family` (a name such as "sd15") to the one
    the pipeline's components match.

    >>> from sdaccel.optim.testing import build_pipeline
    >>> from sdaccel.optim.units.precision import PrecisionConfig, apply_precision
    >>> pipe = build_pipeline("sd15", tiny=True)
    >>> handle = apply_precision(pipe, PrecisionConfig(unet="fp32"))
    >>> handle.name
    'precision'
    >>> handle.remove()
    """
    from ...core.apply import apply

    return apply(pipe, config if config is not None else PrecisionConfig(), device=device, family=family)


__all__ = ["PrecisionConfig", "apply_precision"]
