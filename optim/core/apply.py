"""Apply one optimization to a pipeline by hand: the public `apply_<technique>(pipe, config)` helpers use this.

The sampler prepares pipelines through `apply_all`; a Python user holding a diffusers pipeline should
not need to build an `ApplyContext` to try one technique, so this fills it in from the pipeline.
"""

from __future__ import annotations

from ..spec.errors import ConfigError
from ..spec.optimization import OptimizationConfig, check_conflicts
from .patching import PatchSet, installed
from .registry import ApplyContext, get_unit


def context_for(pipe, *, device=None, family=None) -> ApplyContext:
    """An ApplyContext for `pipe`: device where the UNet's weights are, family matched from its components."""
    import torch

    from ..models.detect import family_of_pipeline
    from ..models.families import Family, get_family

    if device is None:
        device = next(pipe.unet.parameters()).device
    if family is None:
        family = family_of_pipeline(pipe)
    elif not isinstance(family, Family):
        family = get_family(family)
    return ApplyContext(device=torch.device(device), family=family)


def apply(pipe, config: OptimizationConfig, *, device=None, family=None) -> PatchSet:
    """Apply `config` to `pipe` after the optimizations already on it; `remove()` on the result undoes it."""
    if not isinstance(config, OptimizationConfig):
        raise ConfigError("config", f"expected an optimization config, got {type(config).__name__}",
                          "pass e.g. ChannelsLastConfig()")
    present = [p.info["config"] for p in installed(pipe).values() if "config" in p.info]
    check_conflicts(present + [config])
    later = [c for c in present if c.stage > config.stage]
    if later:
        raise ConfigError(f"{type(config).__name__}", f"{config.kind} must be applied before "
                          f"{', '.join(c.kind for c in later)} (the canonical order)",
                          f"remove {', '.join(c.kind for c in later)} first, apply {config.kind}, then apply "
                          "them again (or give all of them to a PipelineSpec)")
    return get_unit(config.kind).apply(pipe, config, context_for(pipe, device=device, family=family))
