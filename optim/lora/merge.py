"""Merging LoRAs into a loaded pipeline's weights, and taking them out bit for bit.

Each adapted weight gets `W + sum(strength * scale * up @ down)`, computed in fp32 and written into the same
Parameter in place (so every reference to the module stays valid). The weight as loaded is kept beside it
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


def _delta(layer: LoraLayer, weight):
    down = layer.down.float().flatten(1)
    up = layer.up.float().flatten(1)
    product = up @ down
    if product.shape != (weight.shape[0], weight[0].numel()):
        return None
    return product.reshape(weight.shape) * layer.scale


def _family_hint(lora: LoraFile, pipe) -> str:
    components = {layer.component for layer in lora.layers}
    if "text_encoder_2" in components and getattr(pipe, "text_encoder_2", None) is None:
        return "it was made for SDXL (two text encoders) and this model has one"
    if getattr(pipe, "text_encoder_2", None) is not None and "text_encoder_2" not in components \
            and any(c == "text_encoder" for c in components):
        return "it looks made for SD 1.x/2.x and this model is SDXL"
    return "it was made for another model family (its layer names or sizes differ from this model's)"


def plan_deltas(pipe, loras) -> tuple[dict, list[str]]:
    """{id(parameter): (parameter, fp32 delta)} summed over `loras` (LoraRefs), and one summary line per LoRA;
    CheckpointError naming the file when a LoRA does not fit this pipeline."""
    deltas: dict = {}
    lines = []
    for ref in loras:
        lora = read_lora(ref.path)
        by_component = {}
        misses, adapted = [], 0
        for layer in lora.layers:
            modules = by_component.setdefault(layer.component, _modules(pipe, layer.component, lora.format))
            module = modules.get(layer.name)
            delta = None if module is None else _delta(layer, module.weight)
            if delta is None:
                misses.append(f"{layer.component}:{layer.name}")
                continue
            adapted += 1
            key = id(module.weight)
            previous = deltas.get(key, (module.weight, 0))[1]
            deltas[key] = (module.weight, previous + delta * ref.strength)
        if misses:
            raise CheckpointError(Path(ref.path), f"does not fit this model: {len(misses)} of {len(lora.layers)} "
                                  f"LoRA layers name layers it lacks or has in other sizes (e.g. {misses[0]}); "
                                  f"{_family_hint(lora, pipe)}",
                                  "Use a LoRA made for this model's family, or load the checkpoint it was made for")
        lines.append(f"LoRA {Path(ref.path).name} x{ref.strength:g}: {adapted} layers ({lora.format} format)")
    return deltas, lines


def restore(state: LoraState) -> None:
    """Put the loaded weights back (bit for bit) and forget them."""
    import torch

    with torch.no_grad():
        for parameter, original in state.originals.values():
            parameter.copy_(original)
    state.originals.clear()
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
    deltas, lines = plan_deltas(pipe, loras) if loras else ({}, [])
    restore(state)
    with torch.no_grad():
        for key, (parameter, delta) in deltas.items():
            state.originals[key] = (parameter, parameter.detach().clone())
            parameter.copy_((parameter.float() + delta).to(parameter.dtype))
    state.applied, state.lines = identities, lines
    state.switch_s = time.perf_counter() - start
    return state
