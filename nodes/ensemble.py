"""SDAccelRefinerEnsemble: SDXL base and refiner as one pipe, switching experts part-way through.

The base model denoises the high-noise part of the schedule and the refiner finishes from the same
latent (the SDXL report's ensemble of expert denoisers; the engine's `run_ensemble`). Toggles wired
after this node apply to both models.
"""

from __future__ import annotations

from ..optim.spec.ensemble import EnsembleSpec
from ..optim.spec.errors import ConfigError
from .inputs import ui_fields, values, widget
from .pipe import PIPE, SDAccelPipe


class SDAccelRefinerEnsemble:
    """Combine an SDXL base pipe and an SDXL refiner pipe; a sampler then runs them as one schedule."""

    CATEGORY = "sdaccel/loaders"
    DESCRIPTION = ("SDXL base + refiner as an ensemble of expert denoisers: the base runs the first switch_at of "
                   "the steps, the refiner the rest, from the same latent. Text-to-image only.")
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    FUNCTION = "combine"

    @classmethod
    def fields(cls):
        return ui_fields(EnsembleSpec)

    @classmethod
    def INPUT_TYPES(cls):
        required = {"base": (PIPE, {"tooltip": "The SDXL base model (with its optimizations)"}),
                    "refiner": (PIPE, {"tooltip": "The SDXL refiner model (sd_xl_refiner_1.0)"})}
        required.update({info.name: widget(info) for info in cls.fields()})
        return {"required": required}

    def combine(self, base: SDAccelPipe, refiner: SDAccelPipe, **given):
        if isinstance(base.spec, EnsembleSpec) or isinstance(refiner.spec, EnsembleSpec):
            raise ConfigError("SDAccelRefinerEnsemble", "an input is already an ensemble",
                              "connect the base and refiner loaders (or their toggles) directly")
        spec = EnsembleSpec(base=base.spec, refiner=refiner.spec, **values(self.fields(), given))
        merged = SDAccelPipe(spec=spec, run_settings=base.run_settings)
        for key, value in refiner.run_settings:
            merged = merged.with_run_settings(**{key: value})
        return (merged,)
