"""SDAccelLoader: a checkpoint (dropdown or path), its family and a device, as an SDACCEL_PIPE.

Loading is deferred to the sampler, where the engine's cache reads each file once; this node only
checks that the file exists, so a typo is reported here and not after a long wait elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from ..optim.spec.errors import CheckpointError, ConfigError
from ..optim.spec.model_ref import ModelRef
from ..optim.spec.pipeline import PipelineSpec
from . import host
from .inputs import ui_fields, values, widget
from .pipe import PIPE, SDAccelPipe

_CKPT_TOOLTIP = ("Checkpoint from ComfyUI's models/checkpoints (.safetensors/.ckpt) or a diffusers folder in "
                 f"models/diffusers. Pick {host.USE_PATH!r} to use the path input instead")
_PATH_SUFFIX = ". When set, it is used instead of ckpt_name"


class SDAccelLoader:
    """Checkpoint loader: one node for every family (detected from the weights, or overridden)."""

    CATEGORY = "sdaccel/loaders"
    DESCRIPTION = ("Choose a Stable Diffusion checkpoint (SD 1.x, SD 2.x, SDXL base/refiner, Turbo, Taiyi). Nothing is "
                   "loaded here: the SDAccel sampler loads it once and keeps it prepared between runs.")
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The checkpoint as an SDAccel pipeline; add optimization nodes, then a sampler",)
    FUNCTION = "load"

    @classmethod
    def model_fields(cls):
        return ui_fields(ModelRef) + ui_fields(PipelineSpec)

    @classmethod
    def INPUT_TYPES(cls):
        required = {"ckpt_name": (host.checkpoint_choices(), {"tooltip": _CKPT_TOOLTIP})}
        for info in cls.model_fields():
            required[info.name] = widget(info, tooltip_suffix=_PATH_SUFFIX if info.name == "path" else "")
        return {"required": required}

    def load(self, ckpt_name: str, **given):
        fields = values(self.model_fields(), given)
        device = fields.pop("device", "auto")
        fields["path"] = _resolve(ckpt_name, fields.get("path", ""))
        model = ModelRef(**fields)
        return (SDAccelPipe(PipelineSpec(model=model, device=device)),)


def _resolve(ckpt_name: str, path: str) -> str:
    """The checkpoint to load: the path input if set, else the dropdown entry's file or folder."""
    path = path.strip()
    if path:
        ref = ModelRef(path=path)
        if not ref.is_synthetic and not Path(path).expanduser().exists():
            raise CheckpointError(path, "no such file or folder", "Check the path input, or clear it and pick "
                                  "ckpt_name")
        return path
    if ckpt_name == host.USE_PATH:
        raise ConfigError("path", "is empty and ckpt_name is set to use it",
                          "pick a checkpoint in ckpt_name or type a file/folder path")
    found = host.resolve_checkpoint(ckpt_name)
    if found is None:
        where = "ComfyUI's checkpoints and diffusers folders" if host.in_comfyui() else "any model folder"
        raise CheckpointError(ckpt_name, f"not found in {where}",
                              "Put the file in models/checkpoints (or a diffusers folder in models/diffusers) and "
                              "refresh, or type its path in the path input")
    return found
