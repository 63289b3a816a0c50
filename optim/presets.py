"""Named benchmark configurations (`bench --preset NAME`), combinable as `a+b`.

A preset adds optimization configs to the spec and/or changes per-run request fields. Whether it
can run here is asked of the units themselves (the same capability checks a real run uses), so an
unavailable preset is skipped with the unit's own reason instead of being faked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import ConfigError, SDAccelError
from .registry import ApplyContext, check_available, check_conflicts, config_class


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    optimizations: tuple = ()  # (kind, {field: value}) pairs, built lazily so presets need no torch at import
    request: dict = field(default_factory=dict)

    def configs(self) -> list:
        return [config_class(kind)(**fields) for kind, fields in self.optimizations]

    def apply(self, spec, request):
        """(spec, request) with this preset's optimizations and request changes applied."""
        for cfg in self.configs():
            base = spec.optimization(cfg.kind)
            if base is not None and cfg.kind == "precision":
                cfg = base.with_(**{k: v for k, v in cfg.to_dict().items() if v != type(cfg)().to_dict()[k]})
            spec = spec.with_optimization(cfg)
        if self.request:
            request = request.with_(**self.request)
        return spec, request

    def unavailable_reason(self, spec, device, family) -> str | None:
        """Why this preset cannot run on `device` (None if it can)."""
        try:
            configs = list(spec.optimizations)
            check_conflicts(configs)
            check_available(configs, ApplyContext(device=device, family=family))
        except SDAccelError as exc:
            return str(exc)
        return None


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("baseline", "Loaded as is: fp32 on a CPU, fp16 on a GPU; nothing else"),
    Preset("fp16", "UNet and text encoders in fp16 (VAE per family rule)",
           (("precision", {"unet": "fp16", "text_encoder": "fp16"}),)),
    Preset("bf16", "UNet and text encoders in bf16 (VAE per family rule)",
           (("precision", {"unet": "bf16", "text_encoder": "bf16"}),)),
    Preset("fp32", "Everything in fp32 (the CPU default; on a GPU, the unoptimized reference)",
           (("precision", {"unet": "fp32", "text_encoder": "fp32", "vae": "fp32"}),)),
    Preset("channels-last", "UNet convolution weights in NHWC layout", (("channels_last", {"unet": True}),)),
)}


def preset_names() -> list[str]:
    return list(PRESETS)


def resolve_preset(name: str) -> Preset:
    """A preset by name; `a+b` combines presets (later ones win on the same field)."""
    parts = [p.strip() for p in name.split("+") if p.strip()]
    if not parts:
        raise ConfigError("preset", "empty preset name", f"choose from: {', '.join(PRESETS)}")
    found = []
    for part in parts:
        if part not in PRESETS:
            raise ConfigError("preset", f"unknown preset {part!r}", f"choose from: {', '.join(PRESETS)}")
        found.append(PRESETS[part])
    if len(found) == 1:
        return found[0]
    merged: dict[str, dict] = {}
    request: dict = {}
    for preset in found:
        for kind, fields in preset.optimizations:
            merged.setdefault(kind, {}).update(fields)
        request.update(preset.request)
    return replace(found[0], name=name, description=" + ".join(p.description for p in found),
                   optimizations=tuple(merged.items()), request=request)
