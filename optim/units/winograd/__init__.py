"""Winograd convolution for the 3x3 stride-1 convolutions of the UNet and the VAE.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour.
"""

from __future__ import annotations

from .config import WinogradConfig


def apply_winograd(pipe, config: WinogradConfig | None = None, *, device=None, family=None):
    """Apply this optimization to a diffusers pipeline; `handle.remove()` restores it exactly.

    `device` defaults to where the UNet's weights are and `family` (a name such as "sd15") to the one
    the pipeline's components match.

    >>> from sdaccel.optim.testing import build_pipeline
    >>> from sdaccel.optim.units.winograd import WinogradConfig, apply_winograd
    >>> pipe = build_pipeline("sd15", tiny=True)
    >>> handle = apply_winograd(pipe, WinogradConfig(tile="f2", fused_transforms=False, vae=False))
    >>> handle.name
    'winograd'
    >>> handle.remove()
    """
    from ...core.apply import apply

    return apply(pipe, config if config is not None else WinogradConfig(), device=device, family=family)


__all__ = ["WinogradConfig", "apply_winograd"]
