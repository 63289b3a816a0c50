"""SDAccelRefinerEnsemble: SDXL base and refiner as one pipe, switching experts part-way through.

The base model denoises the high-noise part of the schedule and the refiner finishes from the same
latent (the SDXL report's ensemble of expert denoisers; the engine's `run_ensemble`). Toggles wired
after this node apply to both models.
"""

from __future__ import annotations

from ..optim.errors import ConfigError
from .pipe import PIPE, SDAccelPipe

SWITCH_AT = ("FLOAT", {"default": 0.9, "min": 0.05, "max": 1.0, "step": 0.01,
                       "tooltip": "Fraction of the schedule the base model denoises before the refiner takes over "
                                  "(the SDXL study recommends 0.9 rather than 0.8; 1.0 = base only)"})


class SDAccelRefinerEnsemble:
    """Combine an SDXL base pipe and an SDXL refiner pipe; a sampler then runs them as one schedule."""

    CATEGORY = "sdaccel/loaders"
    DESCRIPTION = ("SDXL base + refiner as an ensemble of expert denoisers: the base runs the first switch_at of "
                   "the steps, the refiner the rest, from the same latent. Text-to-image only.")
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"base": (PIPE, {"tooltip": "The SDXL base model (with its optimizations)"}),
                             "refiner": (PIPE, {"tooltip": "The SDXL refiner model (sd_xl_refiner_1.0)"}),
                             "switch_at": SWITCH_AT}}

    def combine(self, base: SDAccelPipe, refiner: SDAccelPipe, switch_at: float):
        if base.refiner is not None or refiner.refiner is not None:
            raise ConfigError("SDAccelRefinerEnsemble", "an input is already an ensemble",
                              "connect the base and refiner loaders (or their toggles) directly")
        merged = base.with_refiner(refiner.spec, switch_at)
        for key, value in refiner.run_settings:
            merged = merged.with_run_settings(**{key: value})
        return (merged,)
