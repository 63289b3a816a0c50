"""The original LDM UNet layout (`input_blocks`, `middle_block`, `output_blocks`), as modules, not code.

ComfyUI's `UNetModel`, A1111's `ldm` one and Forge's all keep this structure: each block is a sequence of layers
(ResBlock, SpatialTransformer, Downsample, Upsample, or input block 0's convolution), and the forward concatenates
the hidden state with the popped skip before each output block. The native patches rely on that and nothing else.
"""

from __future__ import annotations

import weakref

import torch

from ..spec.errors import UnavailableError


def find_ldm_unet(model: torch.nn.Module, option: str) -> torch.nn.Module:
    """The LDM-layout UNet `model` is or holds (ComfyUI's BaseModel keeps it as `diffusion_model`); a clear error
    naming `option` for any other architecture (an SD3/Flux-style DiT, a video model)."""
    for candidate in (model, getattr(model, "diffusion_model", None)):
        if candidate is not None and is_ldm_unet(candidate):
            return candidate
    inner = getattr(model, "diffusion_model", model)
    family = getattr(model, "model_config", None)  # the family the host detected, where it keeps one
    named = f" ({type(family).__name__})" if family is not None else ""
    raise UnavailableError(option, f"it works on UNets in the SD/SDXL layout (input_blocks, middle_block, "
                           f"output_blocks) and this model's diffusion model is a {type(inner).__name__}{named}",
                           "use it with SD 1.x, SD 2.x or SDXL models, or bypass this node")


def is_ldm_unet(module) -> bool:
    blocks = [getattr(module, name, None) for name in ("input_blocks", "output_blocks")]
    return (all(isinstance(b, torch.nn.ModuleList) and len(b) > 0 for b in blocks)
            and len(blocks[0]) == len(blocks[1]) and hasattr(module, "middle_block"))


def block_layers(block) -> list[torch.nn.Module]:
    """The layers a host calls one by one (ComfyUI iterates a block's layers itself, so the block's own forward
    is never called there)."""
    if block is None:
        return []
    return list(block) if isinstance(block, torch.nn.Sequential) else [block]


_LAYER_PATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_patches(unet) -> set[str]:
    """The patches replacing layers of `unet` right now (per-step decisions a whole-UNet graph must not freeze)."""
    return set(_LAYER_PATCHES.get(unet, ())) if unet is not None else set()


def mark_layer_patch(unet, name: str, active: bool) -> None:
    names = _LAYER_PATCHES.setdefault(unet, set())
    if active:
        names.add(name)
    else:
        names.discard(name)
