"""`SDACCEL_PIPE`: what flows along the pipe links between SDAccel nodes.

Only data travels: the frozen engine spec (which checkpoint, which optimizations), an optional SDXL
refiner spec with its switch point, and per-run settings that toggles chose (the CFG cutoff). No
weights are loaded until a sampler runs, so toggles cost nothing and ComfyUI can cache them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ..optim.registry import OptimizationConfig, check_conflicts
from ..optim.spec import GenerationRequest, PipelineSpec

PIPE = "SDACCEL_PIPE"
PIPE_TOOLTIP = "An SDAccel pipeline description (checkpoint + optimizations); nothing is loaded until a sampler runs"


@dataclass(frozen=True)
class SDAccelPipe:
    """A pipeline spec plus what the sampler needs besides it. Immutable: every node returns a new one."""

    spec: PipelineSpec
    refiner: PipelineSpec | None = None
    switch_at: float = 0.9
    run_settings: tuple = ()  # sorted (GenerationRequest field, value) pairs set by toggles

    def specs(self) -> tuple[PipelineSpec, ...]:
        return (self.spec,) if self.refiner is None else (self.spec, self.refiner)

    def with_optimization(self, cfg: OptimizationConfig) -> "SDAccelPipe":
        """A new pipe with `cfg` added to every model it holds (replacing one of the same kind).

        Conflicts are checked here, before anything is loaded, so the node that made the combination
        impossible is the one ComfyUI marks, with the engine's message saying how to fix it.
        """
        spec = self.spec.with_optimization(cfg)
        refiner = self.refiner.with_optimization(cfg) if self.refiner is not None else None
        for each in (spec, refiner):
            if each is not None:
                check_conflicts(each.optimizations)
        return replace(self, spec=spec, refiner=refiner)

    def with_run_settings(self, **settings) -> "SDAccelPipe":
        GenerationRequest(**settings)  # validate now, with the engine's messages
        merged = dict(self.run_settings)
        merged.update(settings)
        return replace(self, run_settings=tuple(sorted(merged.items())))

    def with_refiner(self, refiner: PipelineSpec, switch_at: float) -> "SDAccelPipe":
        return replace(self, refiner=refiner, switch_at=switch_at)

    def request(self, **fields) -> GenerationRequest:
        """The engine request for one run: the sampler's fields plus the toggles' per-run settings."""
        return GenerationRequest(**{**fields, **dict(self.run_settings)})

    def toggles(self) -> list[str]:
        """Short names of what is switched on, for the stats badge: `kind(field=value)`, run settings."""
        out = []
        for cfg in self.spec.optimizations:
            changed = {k: v for k, v in cfg.to_dict().items() if v != type(cfg)().to_dict()[k]}
            if cfg.kind == "precision" and not changed:
                continue
            shown = ",".join(f"{k}={_short(v)}" for k, v in changed.items())
            out.append(cfg.kind + (f"({shown})" if changed else ""))
        defaults = GenerationRequest().to_dict()
        out.extend(f"{k}={v}" for k, v in self.run_settings if v != defaults.get(k))
        if self.refiner is not None:
            out.append(f"refiner(switch_at={self.switch_at})")
        return out



def _short(value):
    """File and folder paths by their last part, so the badge stays one line per fact."""
    if isinstance(value, str) and os.sep in value:
        return os.path.basename(value.rstrip(os.sep)) or value
    return value
