"""SDAccelLora: a LoRA from ComfyUI's models/loras (or a path) added to the pipe at a strength.

Like the toggles it only describes: the sampler merges the pipe's LoRAs into the cached weights (the engine's
`optim/lora`), so chaining several nodes stacks them, and switching one reads no checkpoint again. On an SDXL
refiner ensemble the LoRA goes to the base (a base LoRA does not fit the refiner).
"""

from __future__ import annotations

from pathlib import Path

from ..optim.spec.errors import CheckpointError, ConfigError
from ..optim.spec.lora import LoraRef
from ..optim.spec.fields import describe
from . import host
from .inputs import widget
from .pipe import PIPE, PIPE_TOOLTIP, SDAccelPipe


class SDAccelLora:
    """LoRA loader for the SDAccel pipe (kohya/A1111 or diffusers format)."""

    CATEGORY = "sdaccel/loaders"
    DESCRIPTION = ("Add a LoRA (kohya/A1111 or diffusers/PEFT .safetensors) to the pipe at a strength; chain "
                   "several for several LoRAs. Merged into the weights when the sampler runs, and taken out again "
                   "exactly when it is removed or changed, without reloading the checkpoint.")
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        strength = next(info for info in describe(LoraRef) if info.name == "strength")
        return {"required": {
            "pipe": (PIPE, {"tooltip": PIPE_TOOLTIP}),
            "lora_name": (host.lora_choices(), {"tooltip": "A LoRA from ComfyUI's models/loras; pick "
                                                f"{host.USE_PATH!r} to use the path input"}),
            "strength": widget(strength),
            "path": ("STRING", {"default": "", "tooltip": "A LoRA file elsewhere; when set, used instead of "
                                                          "lora_name"}),
        }}

    def apply(self, pipe: SDAccelPipe, lora_name: str, strength: float, path: str = ""):
        path = path.strip() or host.resolve_lora(lora_name) or ""
        if not path:
            raise ConfigError("path", "no LoRA chosen", "pick a LoRA in lora_name or give its path")
        if not Path(path).expanduser().is_file():
            raise CheckpointError(path, "no such file", "check the path, or pick a LoRA from models/loras")
        return (pipe.with_lora(LoraRef(path=path, strength=float(strength))),)
