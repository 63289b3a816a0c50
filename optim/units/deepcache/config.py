"""DeepCache settings: plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...spec.fields import option
from ...spec.optimization import OptimizationConfig, Stage, register_config


@register_config
@dataclass(frozen=True)
class DeepCacheConfig(OptimizationConfig):
    """Cache interval and branch, as in the paper; optional window of steps where caching is allowed."""

    kind: ClassVar[str] = "deepcache"
    stage: ClassVar[Stage] = Stage.UNET_CACHE
    title: ClassVar[str] = "DeepCache"
    lossless: ClassVar[bool] = False
    cache_interval: int = option(3, "Run the full UNet every N steps and reuse its deep features in between. "
                                 "3 gave >2x on SD1.5 in the paper; larger is faster and loses more detail",
                                 min=1, max=20, step=1)
    cache_branch_id: int = option(0, "Skip branch kept live on cached steps: 0 runs only the first layer pair "
                                  "(fastest); higher ids keep more layers (better quality, less speedup)",
                                  min=0, max=40, step=1)
    start_step: int = option(0, "Steps before this always run the full UNet (early steps set the composition)",
                             min=0, max=1000, step=1)
    end_step: int = option(0, "Steps from this one on always run the full UNet (0 = cache until the end; "
                           "a few full final steps sharpen details)", min=0, max=1000, step=1)
