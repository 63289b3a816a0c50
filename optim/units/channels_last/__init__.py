"""Channels-last (NHWC) memory format for convolution weights.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour.
"""

from __future__ import annotations

from .. import public_apply
from .config import ChannelsLastConfig

apply_channels_last = public_apply(ChannelsLastConfig, 'ChannelsLastConfig()')

__all__ = ["ChannelsLastConfig", "apply_channels_last"]
