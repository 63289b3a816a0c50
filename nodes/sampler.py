"""The sampler nodes: text-to-image and image-to-image over an SDACCEL_PIPE.

Inputs are the engine's GenerationRequest fields (same names, defaults, ranges and tooltips);
outputs are ComfyUI's IMAGE and LATENT plus the run statistics as text and on the node's badge.
"""

from __future__ import annotations

from ..optim.spec.pipeline import GenerationRequest
from .generation import KEEP_LOADED_TOOLTIP, generate
from .inputs import ui_fields, values, widget
from .pipe import PIPE, PIPE_TOOLTIP

CATEGORY = "sdaccel/sampling"


def _request_fields(names: tuple[str, ...]):
    by_name = {info.name: info for info in ui_fields(GenerationRequest)}
    return tuple(by_name[name] for name in names)


class SDAccelSampler:
    """Text to image with the pipe's optimizations; the prepared pipeline stays cached between runs."""

    CATEGORY = CATEGORY
    DESCRIPTION = ("Generate images with an SDAccel pipe. The checkpoint is loaded and optimized once and kept "
                   "prepared; the badge shows time, it/s, peak memory and the active toggles of the last run.")
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "LATENT", "STRING")
    RETURN_NAMES = ("image", "latent", "stats")
    OUTPUT_TOOLTIPS = ("The images, [batch, height, width, 3] in 0..1",
                       "The raw VAE latent (ComfyUI's LATENT), e.g. for another sampler or a VAE Decode",
                       "Run statistics: time per stage, it/s, UNet calls, peak memory, active optimizations")
    FIELD_NAMES = ("prompt", "negative_prompt", "width", "height", "steps", "cfg", "seed", "scheduler",
                   "batch_size")

    @classmethod
    def fields(cls):
        return _request_fields(cls.FIELD_NAMES)

    @classmethod
    def INPUT_TYPES(cls):
        required = {"pipe": (PIPE, {"tooltip": PIPE_TOOLTIP})}
        required.update({info.name: widget(info) for info in cls.fields()})
        required["keep_loaded"] = ("BOOLEAN", {"default": True, "tooltip": KEEP_LOADED_TOOLTIP})
        return {"required": required}

    def sample(self, pipe, keep_loaded: bool = True, **given):
        request = pipe.request(**values(self.fields(), given))
        return generate(pipe, request, keep_loaded=keep_loaded)


class SDAccelSamplerImg2Img(SDAccelSampler):
    """Image to image: the source image is encoded, re-noised by `strength`, and denoised again."""

    DESCRIPTION = ("Re-draw an IMAGE with an SDAccel pipe: strength 1.0 ignores the source, low values keep it. "
                   "The output has the source's size (rounded down to a multiple of 8).")
    FIELD_NAMES = ("prompt", "negative_prompt", "strength", "steps", "cfg", "seed", "scheduler")

    @classmethod
    def INPUT_TYPES(cls):
        types = super().INPUT_TYPES()
        required = {"pipe": types["required"].pop("pipe"),
                    "image": ("IMAGE", {"tooltip": "The source image(s); a batch gives one output per image"})}
        required.update(types["required"])
        return {"required": required}

    def sample(self, pipe, image, keep_loaded: bool = True, **given):
        request = pipe.request(init_image=image, batch_size=int(image.shape[0]), **values(self.fields(), given))
        return generate(pipe, request, keep_loaded=keep_loaded)
