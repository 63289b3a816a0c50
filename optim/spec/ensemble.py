"""The SDXL base + refiner ensemble as data: two pipeline specs and the point where the refiner takes over.

The CLI (`generate --refiner`), the ComfyUI nodes and the web UI all hand this one spec to the engine's
sampler, so none of them models the ensemble itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from .errors import ConfigError
from .fields import Config, option
from .model_ref import ModelRef
from .optimization import OptimizationConfig
from .pipeline import PipelineSpec


@dataclass(frozen=True)
class EnsembleSpec(Config):
    """SDXL base and refiner as experts of one schedule: the base denoises the first `switch_at` of it."""

    base: PipelineSpec = field(default_factory=PipelineSpec)
    refiner: PipelineSpec = field(default_factory=PipelineSpec)
    switch_at: float = option(0.9, "Fraction of the schedule the base model denoises before the refiner takes "
                              "over (the SDXL study recommends 0.9 rather than 0.8; 1.0 = base only)", min=0.05,
                              max=1.0, step=0.01)

    def __post_init__(self):
        super().__post_init__()
        for name in ("base", "refiner"):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = PipelineSpec.from_dict(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, PipelineSpec):
                raise ConfigError(f"EnsembleSpec.{name}", f"expected a PipelineSpec, got {type(value).__name__}")

    @classmethod
    def for_models(cls, base: str | ModelRef | PipelineSpec, refiner: str | ModelRef | PipelineSpec,
                   switch_at: float = 0.9) -> "EnsembleSpec":
        """Both models on the base spec's device with its optimizations (a refiner spec is taken as given)."""
        base = _as_spec(base)
        refiner = refiner if isinstance(refiner, PipelineSpec) else replace(base, model=_as_ref(refiner))
        return cls(base=base, refiner=refiner, switch_at=switch_at)

    @property
    def device(self) -> str:
        return self.base.device

    def specs(self) -> tuple[PipelineSpec, PipelineSpec]:
        return self.base, self.refiner

    def with_optimization(self, cfg: OptimizationConfig) -> "EnsembleSpec":
        """A new ensemble with `cfg` added to both models (replacing one of the same kind)."""
        return replace(self, base=self.base.with_optimization(cfg), refiner=self.refiner.with_optimization(cfg))

    def without(self, kind: str) -> "EnsembleSpec":
        return replace(self, base=self.base.without(kind), refiner=self.refiner.without(kind))

    def to_dict(self) -> dict:
        return {"base": self.base.to_dict(), "refiner": self.refiner.to_dict(), "switch_at": self.switch_at}

    @classmethod
    def from_dict(cls, data: dict) -> "EnsembleSpec":
        if not isinstance(data, dict):
            raise ConfigError("EnsembleSpec", f"expected a mapping, got {type(data).__name__}",
                              'write it as {"base": {...}, "refiner": {...}, "switch_at": 0.9}')
        unknown = sorted(set(data) - {"base", "refiner", "switch_at"})
        if unknown:
            raise ConfigError(f"EnsembleSpec.{unknown[0]}", "no such field", "valid: base, refiner, switch_at")
        return cls(base=PipelineSpec.from_dict(data.get("base", {})),
                   refiner=PipelineSpec.from_dict(data.get("refiner", {})), switch_at=data.get("switch_at", 0.9))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EnsembleSpec":
        return cls.from_dict(json.loads(text))


def _as_ref(model) -> ModelRef:
    return model if isinstance(model, ModelRef) else ModelRef(path=model)


def _as_spec(model) -> PipelineSpec:
    return model if isinstance(model, PipelineSpec) else PipelineSpec(model=_as_ref(model))
