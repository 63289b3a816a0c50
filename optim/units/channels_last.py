"""Channels-last (NHWC) memory format for convolution weights.

Lossless. On GPUs with tensor cores and on some CPUs NHWC convolutions avoid layout conversions;
the SDXL optimization guide measured no gain on an RTX 3090, so SDAccel measures it per device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..fields import option
from ..registry import ApplyContext, OptimizationConfig, Stage, Unit, register


@dataclass(frozen=True)
class ChannelsLastConfig(OptimizationConfig):
    """Which modules get NHWC convolution weights."""

    kind: ClassVar[str] = "channels_last"
    unet: bool = option(True, "Store the UNet's 4-D weights channels-last (NHWC). Lossless; faster on some "
                        "GPUs/CPUs, slower on others: see the bench table for this machine")
    vae: bool = option(False, "Also store the VAE's 4-D weights channels-last. Lossless")


def _is_4d(module, key, tensor) -> bool:
    return tensor.dim() == 4


@register
class ChannelsLast(Unit):
    kind = "channels_last"
    title = "Channels-last"
    stage = Stage.MEMORY_FORMAT
    config_cls = ChannelsLastConfig
    lossless = True

    def examples(self) -> list[ChannelsLastConfig]:
        return [ChannelsLastConfig(unet=True, vae=True), ChannelsLastConfig(unet=True, vae=False)]

    def _apply(self, pipe, cfg: ChannelsLastConfig, ctx: ApplyContext, patch) -> None:
        for name in ("unet", "vae"):
            if getattr(cfg, name):
                patch.convert_tensors(getattr(pipe, name), memory_format=torch.channels_last, only=_is_4d)
