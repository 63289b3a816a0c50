"""Channels-last settings: plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...spec.fields import option
from ...spec.optimization import OptimizationConfig, Stage, register_config


@register_config
@dataclass(frozen=True)
class ChannelsLastConfig(OptimizationConfig):
    """Which modules get NHWC convolution weights."""

    kind: ClassVar[str] = "channels_last"
    stage: ClassVar[Stage] = Stage.MEMORY_FORMAT
    title: ClassVar[str] = "Channels-last"
    lossless: ClassVar[bool] = True
    unet: bool = option(True, "Store the UNet's 4-D weights channels-last (NHWC). Lossless; faster on some "
                        "GPUs/CPUs, slower on others: see the bench table for this machine")
    vae: bool = option(False, "Also store the VAE's 4-D weights channels-last. Lossless")
