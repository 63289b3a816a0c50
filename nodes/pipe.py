"""`SDACCEL_PIPE`: what flows along the pipe links between SDAccel nodes.

Only data travels: the frozen engine spec (a `PipelineSpec`, or an `EnsembleSpec` for SDXL base +
refiner) and per-run settings that toggles chose (the CFG cutoff). No weights are loaded until a
sampler runs, so toggles cost nothing and ComfyUI can cache them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ..optim.spec.ensemble import EnsembleSpec
from ..optim.spec.optimization import OptimizationConfig, check_conflicts
from ..optim.spec.pipeline import GenerationRequest, PipelineSpec

PIPE = "SDACCEL_PIPE"
PIPE_TOOLTIP = "An SDAccel pipeline description (checkpoint + optimizations); nothing is loaded until a sampler runs"


@dataclass(frozen=True)
class SDAccelPipe:
    """An engine spec plus the toggles' per-run settings. Immutable: every node returns a new one."""

    spec: PipelineSpec | EnsembleSpec
    run_settings: tuple = ()  # sorted (GenerationRequest field, value) pairs set by toggles

    def specs(self) -> tuple[PipelineSpec, ...]:
        """The pipeline specs the sampler will prepare (two for an ensemble)."""
        return self.spec.specs()

    def with_optimization(self, cfg: OptimizationConfig) -> "SDAccelPipe":
        """A new pipe with `cfg` added to every model it holds (replacing one of the same kind).

        Conflicts are checked here, before anything is loaded, so the node that made the combination
        impossible is the one ComfyUI marks, with the engine's message saying how to fix it.
        """
        spec = self.spec.with_optimization(cfg)
        new = replace(self, spec=spec)
        for each in new.specs():
            check_conflicts(each.optimizations)
        return new

    def with_lora(self, lora) -> "SDAccelPipe":
        """A new pipe with the LoRA (a LoraRef) added after the ones it has; an ensemble's base gets it."""
        if isinstance(self.spec, EnsembleSpec):
            base = replace(self.spec.base, loras=self.spec.base.loras + (lora,))
            return replace(self, spec=replace(self.spec, base=base))
        return replace(self, spec=replace(self.spec, loras=self.spec.loras + (lora,)))

    def with_run_settings(self, **settings) -> "SDAccelPipe":
        GenerationRequest(**settings)  # validate now, with the engine's messages
        merged = dict(self.run_settings)
        merged.update(settings)
        return replace(self, run_settings=tuple(sorted(merged.items())))

    def request(self, **fields) -> GenerationRequest:
        """The engine request for one run: the sampler's fields plus the toggles' per-run settings."""
        return GenerationRequest(**{**fields, **dict(self.run_settings)})

    def toggles(self) -> list[str]:
        """What was asked for (before any fallback): `kind(field=value)`, LoRAs, run settings, the refiner
        switch."""
        return shown_labels(self.specs()[0].optimizations) + self.lora_labels() + self.run_toggles()

    def lora_labels(self) -> list[str]:
        """`lora(file:strength)` for each LoRA the base model merges (a LoRA never falls back: a bad one stops
        the run with its error)."""
        return [f"lora({os.path.basename(lora.path)}:{lora.strength:g})" for lora in self.specs()[0].loras]

    def run_toggles(self) -> list[str]:
        """The per-run settings that differ from the defaults, and the refiner switch point."""
        defaults = GenerationRequest().to_dict()
        out = [f"{k}={v}" for k, v in self.run_settings if v != defaults.get(k)]
        if isinstance(self.spec, EnsembleSpec):
            out.append(f"refiner(switch_at={self.spec.switch_at})")
        return out


def shown_labels(configs) -> list[str]:
    """Badge labels of `configs`, leaving out precision at its defaults (every pipe has one)."""
    return [short_label(cfg) for cfg in configs if cfg.kind != "precision" or cfg.changed()]


def short_label(cfg) -> str:
    """`kind(field=value,...)` with file and folder paths shortened to their last part (one line per fact)."""
    changed = cfg.changed()
    shown = ",".join(f"{k}={_short(v)}" for k, v in changed.items())
    return cfg.kind + (f"({shown})" if changed else "")


def _short(value):
    if isinstance(value, str) and os.sep in value:
        return os.path.basename(value.rstrip(os.sep)) or value
    return value
