"""The combinations the planner measures: bench presets joined with `+`, per device kind.

Lossless ladders first (attention, Winograd on a CPU, then the memory savers: staging, tiling, group offload),
then each lossy part alone on the fastest lossless base, so that its fidelity cost is measured by itself, then
the lossy parts together (with and without a memory saver). A combination a machine cannot run (Winograd on a
GPU, bf16 on a CPU without native bf16) is skipped by the bench with the unit's own reason.
"""

from __future__ import annotations

# Below this PSNR against the baseline image a row changes the picture; above it the difference is float rounding
# (SDPA against the default attention: ~120 dB; Winograd: ~108 dB; bf16 and every lossy unit: under 45 dB).
LOSSLESS_PSNR_DB = 60.0

LOSSY_PARTS = ("tome", "deepcache", "tiny-vae", "cfg-cutoff-50")

_CPU = (
    "baseline", "sdpa", "sdpa+winograd", "sdpa+winograd+staged",
    "sub-quadratic-attention+winograd+group-offload+vae-tiling",
    *(f"sdpa+winograd+{part}" for part in LOSSY_PARTS),
    "sdpa+winograd+deepcache+tiny-vae+cfg-cutoff-50", "sdpa+winograd+staged+deepcache+tiny-vae+cfg-cutoff-50",
)
_CPU_HALF = ("sdpa+bf16", "sdpa+bf16+deepcache+tiny-vae+cfg-cutoff-50")
_GPU = (
    "baseline", "sdpa", "sdpa+channels-last", "sdpa+model-offload", "sdpa+sequential-offload",
    "sdpa+model-offload+vae-tiling",
    *(f"sdpa+{part}" for part in LOSSY_PARTS),
    "sdpa+deepcache+tiny-vae+cfg-cutoff-50", "sdpa+sequential-offload+tiny-vae",
)


def candidate_presets(device_type: str, *, native_bf16: bool = False) -> list[str]:
    """The combinations to measure on a device of this type ("cpu", "cuda", "mps")."""
    if device_type == "cpu":
        return list(_CPU) + (list(_CPU_HALF) if native_bf16 else [])
    return list(_GPU)


def parts_of(preset: str) -> list[str]:
    return [p for p in preset.split("+") if p]


def declared_lossy(part: str) -> bool:
    """Whether a preset changes the image by design (a lossy unit, a half precision, fewer guided steps), whatever
    one measurement at few steps shows: DeepCache over 2 steps barely differs, over 20 it does."""
    from ..bench.presets import PRESETS
    from ..spec.optimization import config_class

    preset = PRESETS.get(part)
    if preset is None:
        return False
    if preset.request or preset.steps_scale is not None:
        return True
    for kind, fields in preset.optimizations:
        if kind == "precision":
            if any(value in ("fp16", "bf16", "half") for value in fields.values()):
                return True
        elif kind == "vae":
            if fields.get("variant", "full") != "full":
                return True
        elif not config_class(kind).lossless:
            return True
    return False
