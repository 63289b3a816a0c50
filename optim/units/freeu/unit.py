"""FreeU (Si et al., 2023, arXiv 2309.11497): re-weight the UNet's backbone and skip features.

Lossy by design, a quality knob: b1/b2 amplify backbone features of the first two up stages, s1/s2
damp their skip features. Published values differ per family, so `auto` picks them from the model.
"""

from __future__ import annotations

from ...core.registry import ApplyContext, Unit, register
from .config import FreeUConfig

# (s1, s2, b1, b2) from the FreeU authors' recommendations (also in diffusers' documentation).
FREEU_DEFAULTS = {
    "sd1": (0.9, 0.2, 1.5, 1.6),
    "sd2": (0.9, 0.2, 1.4, 1.6),
    "sdxl": (0.9, 0.2, 1.3, 1.4),
}


def resolve_factors(cfg: FreeUConfig, family) -> tuple[float, float, float, float]:
    defaults = FREEU_DEFAULTS[family.unet_arch]
    given = (cfg.s1, cfg.s2, cfg.b1, cfg.b2)
    return tuple(v if v > 0 else d for v, d in zip(given, defaults))


@register
class FreeU(Unit):
    config_cls = FreeUConfig

    def examples(self) -> list[FreeUConfig]:
        return [FreeUConfig(), FreeUConfig(s1=0.8, s2=0.3, b1=1.2, b2=1.3)]

    def _apply(self, pipe, cfg: FreeUConfig, ctx: ApplyContext, patch) -> None:
        s1, s2, b1, b2 = resolve_factors(cfg, ctx.family)
        # The attributes diffusers' up blocks read (as UNet2DConditionModel.enable_freeu sets them).
        for block in pipe.unet.up_blocks:
            for name, value in (("s1", s1), ("s2", s2), ("b1", b1), ("b2", b2)):
                patch.set_attr(block, name, value)
        patch.info["factors"] = {"s1": s1, "s2": s2, "b1": b1, "b2": b2}
