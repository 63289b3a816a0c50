"""FreeU settings: plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...spec.fields import option
from ...spec.optimization import OptimizationConfig, Stage, register_config


@register_config
@dataclass(frozen=True)
class FreeUConfig(OptimizationConfig):
    """FreeU factors; 0 means "the published value for this model family"."""

    kind: ClassVar[str] = "freeu"
    stage: ClassVar[Stage] = Stage.UNET_CACHE
    title: ClassVar[str] = "FreeU"
    lossless: ClassVar[bool] = False
    s1: float = option(0.0, "Skip-feature scale, stage 1 (<1 damps low-frequency skip content). 0 = family default "
                       "(0.9)", min=0.0, max=3.0, step=0.05)
    s2: float = option(0.0, "Skip-feature scale, stage 2. 0 = family default (0.2)", min=0.0, max=3.0, step=0.05)
    b1: float = option(0.0, "Backbone scale, stage 1 (>1 strengthens denoising features). 0 = family default "
                       "(SD1 1.5, SD2 1.4, SDXL 1.3)", min=0.0, max=3.0, step=0.05)
    b2: float = option(0.0, "Backbone scale, stage 2. 0 = family default (SD1 1.6, SD2 1.6, SDXL 1.4)", min=0.0,
                       max=3.0, step=0.05)
