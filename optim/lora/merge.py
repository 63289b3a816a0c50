"""Merging LoRAs into a loaded pipeline's weights, and taking them out bit for bit.

Each adapted weight gets `W + sum(strength * scale * up @ down)`, added into the same Parameter in place (one
fused multiply-add per layer for fp32 weights, so every reference to the module stays valid and no weight-sized
temporary is made). The weight as loaded is kept beside it
(only for the adapted layers, as ComfyUI's ModelPatcher keeps its backups), and restoring copies it back:
switching or removing a LoRA restores the exact base weights and reads no checkpoint. Every file is read and
checked against the pipeline before any weight changes, so a bad file leaves the pipeline as it was.

The cache calls `set_loras` with the optimizations removed (they restore the loaded state), so units that
derive data from the weights (precision copies, compiled graphs, Winograd filters) see the merged ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..models.ldm_names import unet_key_to_ldm
from ..spec.errors import CheckpointError
from . import lycoris
from .files import LoraFile, LoraLayer, read_lora


@dataclass
class LoraState:
    """What is merged into one pipeline now: the loaded weights of the adapted layers, and a summary."""

    originals: dict = field(default_factory=dict)  # id(parameter) -> (parameter, its loaded value)
    applied: tuple = ()  # the merged LoRAs' identities (file, size, mtime, strength)
    lines: list = field(default_factory=list)  # one line per LoRA, for the run statistics
    switch_s: float = 0.0


def _modules(pipe, component: str, lora_format: str) -> dict:
    module = getattr(pipe, component, None)
    if module is None:
        return {}
    found = {}
    for name, sub in module.named_modules():
        if getattr(sub, "weight", None) is None or sub.weight.dim() not in (2, 4):
            continue
        names = [name]
        if component != "unet" and not name.startswith("text_model."):
            names.append("text_model." + name)  # LoRA files keep CLIP's `text_model.`, which transformers 5 dropped
        if component == "unet" and lora_format == "kohya":
            try:  # kohya's SDXL LoRAs (and some SD 1.x ones) name the original layout's layers
                names.append(unet_key_to_ldm(name, module.config))
            except (KeyError, ValueError):
                pass
        for each in names:
            found[each.replace(".", "_") if lora_format == "kohya" else each] = sub
    return found


_KIND_NAMES = {"loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr"}


def _fits(layer: LoraLayer, weight) -> bool:
    if layer.kind != "lora":  # LoHa / LoKr: the change's shape, computed on the meta device
        try:
            shape = lycoris.delta(layer, device="meta").shape
        except (RuntimeError, ValueError):  # factors that do not multiply: not this model's layer
            return False
        return shape[0] == weight.shape[0] and shape[1] == weight[0].numel()
    return (layer.up.shape[0] == weight.shape[0] and layer.up[0].numel() == layer.rank
            and layer.down[0].numel() == weight[0].numel())


def _add(parameter, layer: LoraLayer, factor: float) -> None:
    """parameter += factor * the layer's change, in place (a plain LoRA on fp32 weights: one fused multiply-add,
    no weight-sized temporary; LoHa / LoKr build their change first)."""
    import torch

    flat = parameter.view(parameter.shape[0], -1) if parameter.is_contiguous() else None
    if parameter.dtype != torch.float32 or flat is None:
        flat = parameter.float().reshape(parameter.shape[0], -1)
    if layer.kind == "lora":
        up, down = layer.up.float().flatten(1), layer.down.float().flatten(1)
        flat.addmm_(up.to(parameter.device), down.to(parameter.device), alpha=factor * layer.scale)
    else:
        flat.add_(lycoris.delta(layer, device=parameter.device), alpha=factor)
    if flat.data_ptr() != parameter.data_ptr():
        parameter.copy_(flat.view(parameter.shape).to(parameter.dtype))


def _family_hint(lora: LoraFile, pipe) -> str:
    components = {layer.component for layer in lora.layers}
    if "text_encoder_2" in components and getattr(pipe, "text_encoder_2", None) is None:
        return "it was made for SDXL (two text encoders) and this model has one"
    if getattr(pipe, "text_encoder_2", None) is not None and "text_encoder_2" not in components \
            and any(c == "text_encoder" for c in components):
        return "it looks made for SD 1.x/2.x and this model is SDXL"
    return "it was made for another model family (its layer names or sizes differ from this model's)"


def plan(pipe, loras) -> tuple[list, list[str]]:
    """[(parameter, layer, strength)] for `loras` (LoraRefs) in order, and one summary line per LoRA; every file is
    read and checked against `pipe` here (a CheckpointError names the file when a LoRA does not fit)."""
    merges = []
    lines = []
    for ref in loras:
        lora = read_lora(ref.path)
        by_component: dict = {}
        misses, adapted = [], 0
        for layer in lora.layers:
            if layer.component not in by_component:
                by_component[layer.component] = _modules(pipe, layer.component, lora.format)
            module = by_component[layer.component].get(layer.name)
            if module is None or not _fits(layer, module.weight):
                misses.append(f"{layer.component}:{layer.name}")
                continue
            adapted += 1
            merges.append((module.weight, layer, ref.strength))
        if misses:
            raise CheckpointError(Path(ref.path), f"does not fit this model: {len(misses)} of {len(lora.layers)} "
                                  f"LoRA layers name layers it lacks or has in other sizes (e.g. {misses[0]}); "
                                  f"{_family_hint(lora, pipe)}",
                                  "Use a LoRA made for this model's family, or load the checkpoint it was made for")
        described = ", ".join([lora.format] + sorted({_KIND_NAMES[layer.kind] for layer in lora.layers
                                                      if layer.kind in _KIND_NAMES}))
        lines.append(f"LoRA {Path(ref.path).name} x{ref.strength:g}: {adapted} layers ({described} format)")
    return merges, lines


def restore(state: LoraState, keep=frozenset()) -> None:
    """Put the loaded weights back (bit for bit); forget the copies except those of the parameters in `keep`
    (ids), which the next merge adapts again (a switch then copies no weight)."""
    import torch

    with torch.no_grad():
        for parameter, original in state.originals.values():
            parameter.copy_(original)
    for key in [key for key in state.originals if key not in keep]:
        del state.originals[key]
    state.applied, state.lines = (), []


def set_loras(pipe, loras, state: LoraState | None) -> LoraState:
    """Make `loras` (LoraRefs, in order) the ones merged into `pipe`: read and check them all, then restore the
    loaded weights and merge. On a bad file nothing changes and the error names it."""
    import torch

    state = state or LoraState()
    loras = tuple(loras)
    identities = tuple(lora.identity() for lora in loras)
    if identities == state.applied:
        return state
    start = time.perf_counter()
    merges, lines = plan(pipe, loras) if loras else ([], [])
    restore(state, keep={id(parameter) for parameter, _, _ in merges})
    with torch.no_grad():
        for parameter, layer, strength in merges:
            if id(parameter) not in state.originals:
                state.originals[id(parameter)] = (parameter, parameter.detach().clone())
            _add(parameter, layer, strength)
    state.applied, state.lines = identities, lines
    state.switch_s = time.perf_counter() - start
    return state
