"""Specs are data: frozen `PipelineSpec` (what to load and how to optimize it) and `GenerationRequest`
(what to draw with it). `with_()` returns a new spec; both round-trip through JSON.

A `PipelineSpec` holds only structural choices (changing one re-prepares the pipeline); everything
that can change from one image to the next lives in the `GenerationRequest`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from ..models.schedulers import SCHEDULER_CHOICES
from .errors import ConfigError
from .fields import Config, option
from .lora import LoraRef
from .model_ref import ModelRef
from .optimization import OptimizationConfig, canonical_order, config_class

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _optimization_from_dict(data: dict) -> OptimizationConfig:
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError("PipelineSpec.optimizations", f"entry {data!r} has no 'kind'",
                          "write each optimization as {\"kind\": ..., <fields>}")
    body = {k: v for k, v in data.items() if k != "kind"}
    return config_class(data["kind"]).from_dict(body)


@dataclass(frozen=True)
class PipelineSpec(Config):
    """A model plus its ordered optimizations, on a device. Hashable: the prepared-pipeline cache key."""

    model: ModelRef = field(default_factory=ModelRef)
    device: str = option("auto", "Where to run: auto picks CUDA, then Apple MPS, then the CPU",
                         choices=DEVICE_CHOICES)
    optimizations: tuple = ()
    loras: tuple = ()  # LoraRefs, merged into the weights in this order before the optimizations apply

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelRef.from_dict(self.model))
        if not isinstance(self.model, ModelRef):
            raise ConfigError("PipelineSpec.model", f"expected a ModelRef, got {type(self.model).__name__}")
        loras = []
        for item in self.loras:
            if isinstance(item, dict):
                item = LoraRef.from_dict(item)
            elif isinstance(item, str):
                item = LoraRef.parse(item)
            if not isinstance(item, LoraRef):
                raise ConfigError("PipelineSpec.loras", f"{item!r} is not a LoRA", 'write each as {"path": ..., '
                                  '"strength": ...} or "FILE:STRENGTH"')
            loras.append(item)
        object.__setattr__(self, "loras", tuple(loras))
        configs = [(_optimization_from_dict(c) if isinstance(c, dict) else c) for c in self.optimizations]
        for cfg in configs:
            if not isinstance(cfg, OptimizationConfig):
                raise ConfigError("PipelineSpec.optimizations", f"{cfg!r} is not an optimization config")
        if not any(c.kind == "precision" for c in configs):
            configs.append(config_class("precision")())
        object.__setattr__(self, "optimizations", canonical_order(configs))

    @classmethod
    def for_model(cls, path: str, **model_fields) -> "PipelineSpec":
        return cls(model=ModelRef(path=path, **model_fields))

    def specs(self) -> tuple["PipelineSpec", ...]:
        """The pipeline specs a run prepares: this one (an EnsembleSpec has two)."""
        return (self,)

    def optimization(self, kind: str) -> OptimizationConfig | None:
        return next((c for c in self.optimizations if c.kind == kind), None)

    def with_optimization(self, cfg: OptimizationConfig) -> "PipelineSpec":
        """A new spec with `cfg` added, replacing any config of the same kind."""
        kept = tuple(c for c in self.optimizations if c.kind != cfg.kind)
        return replace(self, optimizations=kept + (cfg,))

    def without(self, kind: str) -> "PipelineSpec":
        """A new spec without the optimization `kind` (precision falls back to its defaults)."""
        return replace(self, optimizations=tuple(c for c in self.optimizations if c.kind != kind))

    def to_dict(self) -> dict:
        data = {"model": self.model.to_dict(), "device": self.device,
                "optimizations": [{"kind": c.kind, **c.to_dict()} for c in self.optimizations]}
        if self.loras:  # left out when empty: specs saved before LoRAs existed read back the same
            data["loras"] = [lora.to_dict() for lora in self.loras]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineSpec":
        unknown = sorted(set(data) - {"model", "device", "optimizations", "loras"})
        if unknown:
            raise ConfigError(f"PipelineSpec.{unknown[0]}", "no such field",
                              "valid: model, device, optimizations, loras")
        return cls(model=ModelRef.from_dict(data.get("model", {})), device=data.get("device", "auto"),
                   optimizations=tuple(_optimization_from_dict(d) for d in data.get("optimizations", [])),
                   loras=tuple(data.get("loras", ())))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PipelineSpec":
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class GenerationRequest(Config):
    """One generation: prompt, size, steps, guidance, seed, scheduler; img2img when `init_image` is set.

    None means "the family's default" (e.g. 25 steps and CFG 7 for SD1.5, 1 step and CFG 0 for Turbo).
    """

    prompt: str = option("", "What to draw", multiline=True)
    negative_prompt: str = option("", "What to keep out of the image (used only when CFG > 1)", multiline=True)
    width: int | None = option(None, "Image width in pixels, a multiple of 8. Empty: the family's native size",
                               min=64, max=4096, step=8, ui_default=512)
    height: int | None = option(None, "Image height in pixels, a multiple of 8. Empty: the family's native size",
                                min=64, max=4096, step=8, ui_default=512)
    steps: int | None = option(None, "Denoising steps. Fewer is faster and coarser. Empty: family default "
                               "(25; Turbo 1)", min=1, max=200, ui_default=25)
    cfg: float | None = option(None, "Classifier-free guidance scale. <= 1 skips the negative pass (half the UNet "
                               "work); Turbo models use 0. Empty: family default", min=0.0, max=30.0, step=0.1,
                               ui_default=7.0)
    seed: int = option(0, "Random seed; image i of a batch uses seed + i, so any image can be re-made alone",
                       min=0, max=2**64 - 1)
    batch_size: int = option(1, "Images per run", min=1, max=64)
    scheduler: str = option("auto", "Sampler. auto: the family default (DPM++ 2M Karras; Euler a for Turbo)",
                            choices=SCHEDULER_CHOICES)
    init_image: object = option(None, "img2img source image (PIL image, HxWx3 tensor in 0..1, or a file path)",
                                ui=False)
    strength: float = option(0.75, "img2img only: how far to move from the source (1.0 ignores it)", min=0.0,
                             max=1.0, step=0.01)
    cfg_cutoff: float = option(1.0, "Stop classifier-free guidance after this fraction of the steps (1 = never). "
                               "Later steps run the conditional pass only, so the UNet batch halves: 0.5 saves "
                               "about a quarter of the denoise time, 0.75 about an eighth. Lossy (measured)",
                               min=0.0, max=1.0, step=0.05)
    cfg_cutoff_step: int | None = option(None, "Stop guidance at this step index instead (0-based; overrides "
                                         "cfg_cutoff). Empty: use cfg_cutoff", min=0, max=1000, ui_default=10)

    def __post_init__(self):
        super().__post_init__()
        for name in ("prompt", "negative_prompt"):
            try:
                getattr(self, name).encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ConfigError(f"GenerationRequest.{name}", f"is not valid text (character {exc.start} is an "
                                  "undecodable byte, e.g. from a file or terminal that is not UTF-8)",
                                  "save or type the prompt as UTF-8") from None
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise ConfigError(f"GenerationRequest.{name}", f"{value} is not a multiple of 8",
                                  f"use {value // 8 * 8} or {value // 8 * 8 + 8}")

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    def to_dict(self) -> dict:
        data = super().to_dict()
        if data["init_image"] is not None and not isinstance(data["init_image"], str):
            raise ConfigError("GenerationRequest.init_image", "holds an in-memory image, which JSON cannot hold",
                              "save the image to a file and pass its path")
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GenerationRequest":
        return cls.from_dict(json.loads(text))
