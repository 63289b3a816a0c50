"""Channels-last (NHWC) memory format for convolution weights.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour.
"""

from __future__ import annotations

from .config import ChannelsLastConfig


def apply_channels_last(pipe, config: ChannelsLastConfig | None = None, *, device=None, family=None):
    """Apply this optimization to a diffusers pipeline; `handle.remove()` restores it exactly.

    `device` defaults to where the UNet's weights are and `family` (a name such as "sd15") to the one
    the pipeline's components match.

    >>> from sdaccel.optim.testing import build_pipeline
    >>> from sdaccel.optim.units.channels_last import ChannelsLastConfig, apply_channels_last
    >>> pipe = build_pipeline("sd15", tiny=True)
    >>> handle = apply_channels_last(pipe, ChannelsLastConfig())
    >>> handle.name
    'channels_last'
    >>> handle.remove()
    """
    from ...core.apply import apply

    return apply(pipe, config if config is not None else ChannelsLastConfig(), device=device, family=family)


__all__ = ["ChannelsLastConfig", "apply_channels_last"]
