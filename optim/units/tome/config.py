"""Token merging settings: plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...spec.fields import option
from ...spec.optimization import OptimizationConfig, Stage, register_config


@register_config
@dataclass(frozen=True)
class ToMeConfig(OptimizationConfig):
    """Token merging for SD (Bolya & Hoffman 2023): similar tokens merged before self-attention, split after."""

    kind: ClassVar[str] = "tome"
    stage: ClassVar[Stage] = Stage.UNET_CACHE
    title: ClassVar[str] = "Token merging (ToMe)"
    lossless: ClassVar[bool] = False
    ratio: float = option(0.5, "Share of the self-attention tokens merged into others (0.5 is tomesd's default; "
                          "more is faster and softer)", min=0.0, max=0.75, step=0.05)
    max_downsample: int = option(1, "Merge only on the largest maps with attention (1; most of the attention "
                                 "cost) or down to maps this many times smaller (2/4/8 reach deeper blocks); counted "
                                 "from SDXL's first attention level, which is downsampled 2x",
                                 choices=(1, 2, 4, 8), min=1, max=8)
    stride: int = option(2, "Side of the square window each kept (destination) token stands for", min=2, max=4,
                         step=1)
