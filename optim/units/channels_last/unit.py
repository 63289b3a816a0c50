"""Channels-last (NHWC) memory format for convolution weights.

Lossless. On GPUs with tensor cores and on some CPUs NHWC convolutions avoid layout conversions;
the SDXL optimization guide measured no gain on an RTX 3090, so SDAccel measures it per device.
"""

from __future__ import annotations

import torch

from ...core.registry import ApplyContext, Unit, register
from .config import ChannelsLastConfig


def _is_4d(module, key, tensor) -> bool:
    return tensor.dim() == 4


@register
class ChannelsLast(Unit):
    config_cls = ChannelsLastConfig

    def examples(self) -> list[ChannelsLastConfig]:
        return [ChannelsLastConfig(unet=True, vae=True), ChannelsLastConfig(unet=True, vae=False)]

    def _apply(self, pipe, cfg: ChannelsLastConfig, ctx: ApplyContext, patch) -> None:
        for name in ("unet", "vae"):
            if getattr(cfg, name):
                patch.convert_tensors(getattr(pipe, name), memory_format=torch.channels_last, only=_is_4d)
