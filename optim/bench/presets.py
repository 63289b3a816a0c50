"""Named benchmark configurations (`bench --preset NAME`), combinable as `a+b`.

A preset adds optimization configs to the spec and/or changes per-run request fields. Whether it
can run here is asked of the units themselves (the same capability checks a real run uses), so an
unavailable preset is skipped with the unit's own reason instead of being faked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..spec.errors import ConfigError, SDAccelError
from ..spec.optimization import check_conflicts, config_class


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    optimizations: tuple = ()  # (kind, {field: value}) pairs, built lazily so presets need no torch at import
    request: dict = field(default_factory=dict)
    steps_scale: float | None = None  # "30 steps where the baseline runs 50": steps = round(scale * --steps)
    runner: str = "run"  # "run", or "ensemble" (SDXL base + refiner)
    needs: str = ""  # a family requirement checked before running ("sdxl")
    lora: str = ""  # the LoRA file real use needs (LCM-LoRA, TCD-LoRA); the bench's random weights need none

    def configs(self) -> list:
        return [config_class(kind)(**fields) for kind, fields in self.optimizations]

    def apply(self, spec, request):
        """(spec, request) with this preset's optimizations and request changes applied."""
        for cfg in self.configs():
            base = spec.optimization(cfg.kind)
            if base is not None and cfg.kind == "precision":
                cfg = base.with_(**cfg.changed())
            spec = spec.with_optimization(cfg)
        return spec, self.apply_request(request)

    def apply_request(self, request):
        """`request` with this preset's per-run changes (request fields, the step scale)."""
        if self.request:
            request = request.with_(**self.request)
        if self.steps_scale is not None and request.steps and "steps" not in self.request:
            # a preset that fixes the steps (lcm, tcd, lightning) keeps them when combined with a step share
            request = request.with_(steps=max(1, int(round(request.steps * self.steps_scale))))
        return request

    def unavailable_reason(self, spec, device, family) -> str | None:
        """Why this preset cannot run on `device` (None if it can)."""
        from ..core.registry import ApplyContext, check_available

        if self.needs == "sdxl" and family.name not in ("sdxl-base", "sdxl-turbo"):
            return f"needs an SDXL base model (this is {family.title}); run bench --family sdxl-base"
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
    Preset("vae-fp16-fix", "fp16-fix VAE (random weights, the family's AutoencoderKL) running in fp16 "
           "(skipped on a CPU without native fp16)", (("precision", {"vae": "fp16"}), ("vae", {"variant": "fp16_fix", "path": "synthetic"}))),
    Preset("tiny-vae", "Tiny VAE (TAESD architecture, random weights) decodes instead of the full VAE",
           (("vae", {"variant": "tiny", "path": "synthetic"}),)),
    Preset("vae-slicing", "VAE decodes a batch one image at a time", (("vae", {"slicing": True}),)),
    Preset("vae-tiling", "VAE decodes in overlapping tiles", (("vae", {"tiling": True}),)),
    Preset("tf32-off", "TF32 off for cuDNN and matmuls during the run (exact fp32; NVIDIA GPUs only)",
           (("precision", {"tf32": "off"}),)),
    Preset("sdpa", "PyTorch scaled-dot-product attention (--opt-sdp-attention)",
           (("attention", {"backend": "sdpa"}),)),
    Preset("sliced-attention", "Attention one slice of heads at a time (--opt-split-attention)",
           (("attention", {"backend": "sliced"}),)),
    Preset("sub-quadratic-attention", "Chunked attention with an online softmax (--opt-sub-quad-attention)",
           (("attention", {"backend": "sub_quadratic"}),)),
    Preset("xformers", "xformers memory-efficient attention (--xformers; NVIDIA GPUs only)",
           (("attention", {"backend": "xformers"}),)),
    Preset("model-offload", "Whole components visit the GPU in turn", (("offload", {"mode": "model"}),)),
    Preset("sequential-offload", "Every sub-module visits the GPU per call", (("offload", {"mode": "sequential"}),)),
    Preset("group-offload", "Groups of blocks offloaded with overlapped copies (spills to disk on a CPU)",
           (("offload", {"mode": "group"}),)),
    Preset("staged", "Component staging (--medvram): encoders, UNet and VAE take turns (on a CPU idle parts wait "
           "on disk)", (("offload", {"mode": "staged"}),)),
    Preset("lowvram", "UNet blocks visit the GPU one at a time (--lowvram)", (("offload", {"mode": "lowvram"}),)),
    Preset("freeu", "FreeU with the family's published factors", (("freeu", {}),)),
    Preset("winograd", "Winograd F(2,3)/F(4,3)/F(6,3) convolutions where measured faster than F.conv2d (CPU)",
           (("winograd", {}),)),
    Preset("deepcache", "DeepCache, interval 3, branch 0", (("deepcache", {"cache_interval": 3,
                                                                           "cache_branch_id": 0}),)),
    Preset("tome", "Token merging: half of the self-attention tokens on the largest maps merged (tomesd's default)",
           (("tome", {"ratio": 0.5}),)),
    Preset("steps-30", "30 steps where the baseline runs 50 (60% of --steps)", steps_scale=0.6),
    Preset("steps-25", "25 steps where the baseline runs 50 (50% of --steps)", steps_scale=0.5),
    Preset("steps-20", "20 steps where the baseline runs 50 (40% of --steps)", steps_scale=0.4),
    Preset("cfg-cutoff-50", "Guidance stops after 50% of the steps", request={"cfg_cutoff": 0.5}),
    Preset("cfg-cutoff-75", "Guidance stops after 75% of the steps", request={"cfg_cutoff": 0.75}),
    Preset("lcm", "LCM scheduler, 4 steps, CFG 1.5: for an LCM-LoRA (lcm-lora-sdv1-5 / lcm-lora-sdxl, merged at "
           "strength 1) or an LCM-distilled checkpoint; the steps are fixed, not a share of --steps",
           request={"scheduler": "lcm", "steps": 4, "cfg": 1.5}, lora="lcm-lora-sdv1-5.safetensors"),
    Preset("tcd", "TCD scheduler (gamma 0.3), 4 steps, no CFG: for a TCD-LoRA (TCD-SD15 / TCD-SDXL) merged at "
           "strength 1; the steps are fixed", request={"scheduler": "tcd", "steps": 4, "cfg": 1.0},
           lora="tcd-sd15-lora.safetensors"),
    Preset("lightning", "Euler on trailing timesteps, 4 steps, no CFG: the setup SDXL-Lightning and Hyper-SD "
           "4-step checkpoints (or their LoRAs) are distilled for; the steps are fixed",
           request={"scheduler": "euler_trailing", "steps": 4, "cfg": 1.0}),
    Preset("refiner-ensemble", "SDXL base denoises 90% of the schedule, the refiner the rest (same toggles)",
           runner="ensemble", needs="sdxl"),
    Preset("fastest", "The seed study's fastest recipe: compiled UNet + Tiny VAE + CFG cutoff at 75% + 30 of 50 "
           "steps, plus DeepCache (SDAccel's DeepCache combines with the CFG cutoff), in the half precision the "
           "machine runs natively as the study's fp16 GPU runs did (bf16 on a CPU with AVX512-BF16/AMX, else fp32)",
           (("precision", {"unet": "half", "text_encoder": "half"}),
            ("compile", {"backend": "inductor", "freezing": True}), ("vae", {"variant": "tiny", "path": "synthetic"}),
            ("deepcache", {"cache_interval": 3, "cache_branch_id": 0})), request={"cfg_cutoff": 0.75},
           steps_scale=0.6),
    Preset("under-4gb", "Sequential offload + Tiny VAE (0.68 GB peak for SDXL on a 3090 in the study)",
           (("offload", {"mode": "sequential"}), ("vae", {"variant": "tiny", "path": "synthetic"}))),
    Preset("under-6gb", "Component staging (5.77 GB for SDXL in the study, no time cost)",
           (("offload", {"mode": "staged"}),)),
    Preset("under-8gb", "Compiled UNet + Tiny VAE (6.91 GB for SDXL in the study)",
           (("compile", {"backend": "inductor", "freezing": True}), ("vae", {"variant": "tiny", "path": "synthetic"}))),
    Preset("compile-inductor", "UNet compiled by torch.compile (inductor) with freezing, the setting that helps on a "
           "CPU (weights baked in); the first run pauses to compile (compile_s, ~2 min for a full UNet on 2 cores)",
           (("compile", {"backend": "inductor", "freezing": True}),)),
    Preset("compile-openvino", "UNet converted to OpenVINO and compiled for the CPU (fp32); the first run pauses to "
           "convert (compile_s, ~1-2 min for a full UNet)", (("compile", {"backend": "openvino"}),)),
    Preset("openvino-native", "UNet, VAE decoder and text encoder converted to OpenVINO in the precision it picks for "
           "this CPU (bf16 with AVX512-BF16 or AMX, else fp32): the configuration of optimum-intel's default "
           "pipeline; lossy where it picks bf16",
           (("compile", {"backend": "openvino", "targets": "unet+vae+text_encoder", "openvino_precision": "auto"}),)),
    Preset("openvino-int8", "UNet and VAE decoder in OpenVINO with int8 weights and activations (NNCF), calibrated on "
           "the first run's own UNet and decoder inputs (that run stays uncompiled, the int8 models are built when it "
           "ends): int8 products on CPUs with VNNI or AMX; lossy",
           (("compile", {"backend": "openvino", "targets": "unet+vae", "openvino_precision": "auto",
                         "openvino_int8": "full"}),)),
    Preset("openvino-int8-weights", "UNet and VAE decoder in OpenVINO with the weights stored in int8 (NNCF weight "
           "compression): about a quarter of the memory for weights, computed in float; lossy",
           (("compile", {"backend": "openvino", "targets": "unet+vae", "openvino_precision": "auto",
                         "openvino_int8": "weights"}),)),
)}


def preset_names() -> list[str]:
    return list(PRESETS)


def _with_fields(preset: Preset, text: str) -> Preset:
    """`preset` with `field=value,...` set on its optimizations that have those fields (a sweep: `tome:ratio=0.3`)."""
    from ..spec.fields import describe, parse_text

    changes = [item.partition("=") for item in text.split(",") if item.strip()]
    optimizations = [(kind, dict(fields)) for kind, fields in preset.optimizations]
    for key, sep, raw in changes:
        key = key.strip()
        owners = [(kind, fields, info) for kind, fields in optimizations
                  for info in describe(config_class(kind)) if info.name == key]
        if not sep or not owners:
            known = sorted({info.name for kind, _ in optimizations for info in describe(config_class(kind))})
            raise ConfigError("preset", f"{preset.name}:{text}: {key!r} is not a field of its optimizations",
                              f"write {preset.name}:FIELD=VALUE with a field of: {', '.join(known) or 'none'}")
        for kind, fields, info in owners:
            fields[key] = parse_text(config_class(kind).__name__, info, raw)
    return replace(preset, name=f"{preset.name}:{text}", optimizations=tuple(optimizations),
                   description=f"{preset.description} [set here: {text}]")


def resolve_preset(name: str) -> Preset:
    """A preset by name; `a+b` combines presets (later ones win on the same field); `name:field=value,...` sets
    fields of the preset's optimizations (a sweep, e.g. `tome:ratio=0.3`)."""
    parts = [p.strip() for p in name.split("+") if p.strip()]
    if not parts:
        raise ConfigError("preset", "empty preset name", f"choose from: {', '.join(PRESETS)}")
    found = []
    for part in parts:
        base, _, fields = part.partition(":")
        if base not in PRESETS:
            raise ConfigError("preset", f"unknown preset {base!r}", f"choose from: {', '.join(PRESETS)}")
        found.append(_with_fields(PRESETS[base], fields) if fields else PRESETS[base])
    if len(found) == 1:
        return found[0] if found[0].name == name else replace(found[0], name=name)
    merged: dict[str, dict] = {}
    request: dict = {}
    for preset in found:
        for kind, fields in preset.optimizations:
            merged.setdefault(kind, {}).update(fields)
        request.update(preset.request)
    scales = [p.steps_scale for p in found if p.steps_scale is not None]
    ensemble = [p for p in found if p.runner != "run"]
    return replace(found[0], name=name, description=" + ".join(p.description for p in found),
                   optimizations=tuple(merged.items()), request=request, steps_scale=scales[-1] if scales else None,
                   runner=ensemble[-1].runner if ensemble else "run",
                   needs=next((p.needs for p in found if p.needs), ""))
