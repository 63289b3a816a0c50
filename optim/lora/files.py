"""Reading a LoRA file: which format it is, and its layers as (component, module name) -> low-rank factors.

Files are opened through the checkpoint reader (safetensors read as data; `.ckpt`/`.pt` only through
`torch.load(weights_only=True)`). Formats:
- kohya / A1111: `lora_unet_<module path with _>`, `lora_te_` (SD 1.x/2.x), `lora_te1_`/`lora_te2_` (SDXL's two
  text encoders), each with `.lora_down.weight`, `.lora_up.weight` and an optional `.alpha`;
- diffusers / PEFT: `unet.<module path>` (or `text_encoder.` / `text_encoder_2.`) with `.lora_A.weight` /
  `.lora_B.weight`, `.lora.down.weight` / `.lora.up.weight`, or the older attention-processor names
  (`.processor.to_q_lora.down.weight`), an optional `.alpha`;
- LyCORIS LoHa (`.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b`, optional Tucker `.hada_t1`/`.hada_t2`) and
  LoKr (`.lokr_w1` or `.lokr_w1_a`/`_b`, `.lokr_w2` or `.lokr_w2_a`/`_b`, optional `.lokr_t2`) under kohya's names:
  their layers carry the factors and `lycoris.delta` builds the weight change;
- LyCORIS OFT, GLoRA and full-weight diffs are named in a clear error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..spec.errors import CheckpointError

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
_UNSUPPORTED = ((r"\.oft_", "LyCORIS OFT"), (r"\.a1\.weight$", "LyCORIS GLoRA"),
                (r"\.diff$", "LyCORIS full-weight diff"))  # key pattern, format
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"} | {
    f"hada_{part}": f"hada_{part}" for part in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")} | {
    f"lokr_{part}": f"lokr_{part}" for part in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}
_DIFFUSERS_ROLES = (("lora_A.weight", "down"), ("lora_B.weight", "up"), ("lora.down.weight", "down"),
                    ("lora.up.weight", "up"), ("lora_down.weight", "down"), ("lora_up.weight", "up"),
                    ("alpha", "alpha"))


@dataclass
class LoraLayer:
    """One adapted layer. A plain LoRA: `delta = up @ down * alpha / rank` (rank = down's first dimension); LoHa
    and LoKr keep their factors in `factors` (`hada_w1_a`, `lokr_w1`, ...) and `lycoris.delta` builds theirs."""

    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    name: str  # kohya: the module path with "_" for "."; diffusers: the dotted module path
    down: object = None
    up: object = None
    alpha: float | None = None
    factors: dict = field(default_factory=dict)  # LyCORIS roles -> tensors

    @property
    def kind(self) -> str:
        """"lora", "loha" or "lokr"."""
        return next((kind for prefix, kind in (("hada_", "loha"), ("lokr_", "lokr"))
                     if any(role.startswith(prefix) for role in self.factors)), "lora")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class LoraFile:
    path: Path
    format: str  # "kohya" | "diffusers"
    layers: list[LoraLayer]


def _fix(path) -> str:
    return f"Check that {Path(path).name} is a LoRA for Stable Diffusion (kohya/A1111 or diffusers format)"


def read_lora(path) -> LoraFile:
    """The LoRA at `path`, or a CheckpointError naming the file and what is wrong with it."""
    from ..models.checkpoint import open_checkpoint

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(path, "does not exist", "Give the path of a LoRA file (.safetensors)")
    ckpt = open_checkpoint(path)
    keys = list(ckpt.keys())
    for pattern, name in _UNSUPPORTED:
        if any(re.search(pattern, key) for key in keys):
            raise CheckpointError(path, f"is a {name} file, which SDAccel does not merge yet",
                                  "Use a LoRA, LoHa or LoKr file, or merge it into the checkpoint with a LyCORIS "
                                  "tool")
    if any(key.startswith(tuple(KOHYA_PREFIXES)) for key in keys):
        return LoraFile(path, "kohya", _group(path, ckpt, keys, _kohya_key))
    if any(key.startswith(tuple(DIFFUSERS_PREFIXES)) and _diffusers_role(key) for key in keys):
        return LoraFile(path, "diffusers", _group(path, ckpt, keys, _diffusers_key))
    if any(key.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for key in keys):
        raise CheckpointError(path, "is a full model checkpoint, not a LoRA", "Load it as the checkpoint instead")
    raise CheckpointError(path, f"holds no LoRA layers SDAccel knows (first keys: {', '.join(keys[:3])})",
                          _fix(path))


def _kohya_key(key: str):
    prefix = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
    if prefix is None:
        return None
    module, _, role = key[len(prefix):].partition(".")
    role = _KOHYA_ROLES.get(role)
    return (KOHYA_PREFIXES[prefix], module, role) if role else None


def _diffusers_role(key: str):
    return next(((suffix, role) for suffix, role in _DIFFUSERS_ROLES if key.endswith("." + suffix)), None)


def _diffusers_key(key: str):
    prefix = next((p for p in sorted(DIFFUSERS_PREFIXES, key=len, reverse=True) if key.startswith(p)), None)
    found = _diffusers_role(key)
    if prefix is None or found is None:
        return None
    suffix, role = found
    module = key[len(prefix):-len(suffix) - 1]
    module = re.sub(r"\.processor\.(to_[qkv]|to_out)_lora$", lambda m: "." + m.group(1), module)
    module = re.sub(r"\.to_out$", ".to_out.0", module)
    return DIFFUSERS_PREFIXES[prefix], module, role


def _group(path, ckpt, keys, parse) -> list[LoraLayer]:
    layers: dict[tuple, LoraLayer] = {}
    wanted = {}
    for key in keys:
        parsed = parse(key)
        if parsed is not None:
            wanted[key] = parsed
    tensors = ckpt.read(keys=list(wanted))
    for key, (component, module, role) in wanted.items():
        layer = layers.setdefault((component, module), LoraLayer(component, module))
        value = tensors[key]
        if role == "alpha":
            layer.alpha = float(value.float().reshape(-1)[0])
        elif role in ("down", "up"):
            setattr(layer, role, value)
        else:
            layer.factors[role] = value
    incomplete = [f"{c}:{m}" for (c, m), layer in layers.items() if not _complete(layer)]
    if incomplete:
        raise CheckpointError(path, f"has LoRA layers without all their factors (e.g. {incomplete[0]})",
                              "The file is incomplete: download it again")
    if not layers:
        raise CheckpointError(path, "holds no LoRA layers", _fix(path))
    return list(layers.values())


def _complete(layer: LoraLayer) -> bool:
    """Whether `layer` has every factor its kind needs (LoKr: each side whole or as two factors)."""
    if layer.kind == "loha":
        return all(f"hada_{part}" in layer.factors for part in ("w1_a", "w1_b", "w2_a", "w2_b"))
    if layer.kind == "lokr":
        return all(f"lokr_{side}" in layer.factors or {f"lokr_{side}_a", f"lokr_{side}_b"} <= layer.factors.keys()
                   for side in ("w1", "w2"))
    return layer.down is not None and layer.up is not None
