"""Tell the model family from a checkpoint's keys and shapes (or a diffusers folder's configs).

Keys decide the group (SD1, Taiyi, SD2, SDXL, SDXL refiner). Inside a group the weights can look
identical (SD2 base vs 768-v vs SD-Turbo; SDXL vs SDXL-Turbo): there SDAccel uses the weight
statistic ComfyUI uses for v-prediction, the file name, then the family default, and logs what it
assumed so the user can override it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..spec.errors import CheckpointError
from .checkpoint import CheckpointFile
from .families import FAMILIES, PREDICTION_TYPES, Family, get_family

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
UNET_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"

# Text-encoder prefixes in the original (LDM / generative-models) layout.
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
XL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

_V_PRED_PROBE_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
_V_PRED_STD_THRESHOLD = 0.09  # the statistic ComfyUI uses to tell SD2 768-v from epsilon models

GROUP_FAMILIES = {group: tuple(name for name, fam in FAMILIES.items() if fam.group == group)
                  for group in dict.fromkeys(fam.group for fam in FAMILIES.values())}
GROUP_TITLES = {"sd1": "Stable Diffusion 1.x", "taiyi": "Taiyi (SD1 UNet + Chinese BERT)",
                "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}


@dataclass(frozen=True)
class Detection:
    """What a checkpoint is, and what had to be assumed to say so."""

    family: Family
    prediction_type: str
    group: str
    assumed: tuple[str, ...] = ()


def _first(ck: CheckpointFile, pattern: str) -> str | None:
    rx = re.compile(pattern)
    return next((k for k in ck.keys() if rx.search(k)), None)


def _describe_foreign(ck: CheckpointFile) -> tuple[str, str] | None:
    """Name what a non-SD file most likely is, with what to do about it."""
    keys = list(ck.keys())
    joined = "\n".join(keys[:4000])
    if re.search(r"lora_(unet|te)|\.lora_(up|down|A|B)\.|\.alpha$", joined, re.M):
        return "a LoRA, not a full model", "Load a base checkpoint and apply the LoRA in your host's LoRA loader"
    if "string_to_param" in joined or "emb_params" in joined or (len(keys) <= 4 and {"clip_l", "clip_g"} & set(keys)):
        return "a textual-inversion embedding, not a model", "Put it in the embeddings folder"
    if "control_model." in joined or "controlnet_cond_embedding" in joined:
        return "a ControlNet, not a base model", "Put it in the controlnet folder"
    if re.search(r"^(double_blocks|joint_blocks|model\.diffusion_model\.(joint|double)_blocks)", joined, re.M):
        return "an SD3/Flux-style transformer model", "SDAccel supports SD 1.x, SD 2.x, SDXL, the Turbos and Taiyi"
    if re.search(r"^(first_stage_model\.)?(encoder|decoder)\.(conv_in|down|up|mid)", joined, re.M) and not \
            ck.has_prefix(UNET_PREFIX):
        return "a standalone VAE, not a full model", "Use it as a VAE variant, or pick a full checkpoint"
    if re.search(r"^(down_blocks|up_blocks|mid_block)\.", joined, re.M):
        return "a diffusers-format UNet on its own", "Point SDAccel at the whole diffusers folder (with model_index.json)"
    if re.search(r"^(text_model|encoder\.layer)\.", joined, re.M):
        return "a text encoder on its own", "Pick a full Stable Diffusion checkpoint"
    return None


def _text_widths(ck: CheckpointFile) -> tuple[str, list[int]]:
    """(group, widths of the text encoders) from the text-encoder keys present."""
    xl_clip = ck.shape(XL_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight")
    xl_open = ck.shape(XL_OPENCLIP_PREFIX + "token_embedding.weight")
    ref_open = ck.shape(REFINER_OPENCLIP_PREFIX + "token_embedding.weight")
    sd2_open = ck.shape(SD2_OPENCLIP_PREFIX + "token_embedding.weight")
    bert = ck.shape(SD1_CLIP_PREFIX + "embeddings.word_embeddings.weight")
    clip = ck.shape(SD1_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight") or \
        ck.shape(SD1_CLIP_PREFIX + "embeddings.token_embedding.weight")
    if xl_clip and xl_open:
        return "sdxl", [xl_clip[1], xl_open[1]]
    if ref_open and not xl_clip:
        return "sdxl-refiner", [ref_open[1]]
    if sd2_open:
        return "sd2", [sd2_open[1]]
    if bert:
        return "taiyi", [bert[1]]
    if clip:
        return "sd1", [clip[1]]
    return "", []


def detect_single_file(ck: CheckpointFile, family: str = "auto", prediction_type: str = "auto") -> Detection:
    """Detect the family of an LDM-layout single-file checkpoint, honouring user overrides."""
    if not ck.has(UNET_IN_KEY):
        foreign = _describe_foreign(ck)
        if foreign:
            raise CheckpointError(ck.path, f"is {foreign[0]}", foreign[1])
        raise CheckpointError(ck.path, "is not a Stable Diffusion checkpoint (no UNet weights under "
                              f"'{UNET_PREFIX}')", "Pick a full SD 1.x/2.x/XL checkpoint")
    in_channels = ck.shape(UNET_IN_KEY)[1]
    if in_channels != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(in_channels,
                                                                              f"a {in_channels}-channel UNet")
        raise CheckpointError(ck.path, f"is {kind} (UNet input has {in_channels} channels), an unsupported "
                              "architecture", "Use a text-to-image checkpoint of a supported family")
    group, widths = _text_widths(ck)
    if not group:
        foreign = _describe_foreign(ck)
        raise CheckpointError(ck.path, "holds a UNet but no text encoder SDAccel recognises (unknown "
                              "architecture)", foreign[1] if foreign else
                              "Supported: " + ", ".join(GROUP_TITLES.values()))
    ctx_key = _first(ck, r"^model\.diffusion_model\..*attn2\.to_k\.weight$")
    if ctx_key is not None:
        context = ck.shape(ctx_key)[1]
        if context != sum(widths):
            raise CheckpointError(ck.path, f"has an unknown architecture: UNet cross-attention width {context} "
                                  f"does not match its text encoder width {sum(widths)}",
                                  "Supported: " + ", ".join(GROUP_TITLES.values()))
    if not ck.has_prefix(VAE_PREFIX):
        raise CheckpointError(ck.path, "has no VAE weights (first_stage_model.*)",
                              "Pick a checkpoint that includes its VAE (most do)")
    return _choose_family(ck.path, group, family, prediction_type, lambda: _v_pred_statistic(ck))


def _v_pred_statistic(ck: CheckpointFile) -> float | None:
    if not ck.has(_V_PRED_PROBE_KEY):
        return None
    tensor = ck.read(keys=[_V_PRED_PROBE_KEY])[_V_PRED_PROBE_KEY]
    return float(tensor.float().std(unbiased=False))


def _choose_family(path, group: str, family: str, prediction_type: str, v_stat, hints=None) -> Detection:
    """Pick the family inside `group`: the user's override if compatible, else evidence, else the default."""
    if prediction_type not in PREDICTION_TYPES:
        raise CheckpointError(path, f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}",
                              "Use auto, epsilon or v_prediction")
    allowed = GROUP_FAMILIES[group]
    assumed: list[str] = []
    name = Path(str(path)).name.lower()
    if family and family != "auto":
        fam = get_family(family)
        if fam.name not in allowed:
            raise CheckpointError(path, f"does not match family {fam.name!r}: its weights are "
                                  f"{GROUP_TITLES[group]}", f"Remove the family override, or use one of: "
                                  f"{', '.join(allowed)}")
    elif len(allowed) == 1:
        fam = FAMILIES[allowed[0]]
    else:
        hints = hints or {}
        turbo_source = "the scheduler config" if hints.get("turbo") else "the file name" if "turbo" in name else None
        stat = (hints.get("v_stat") if "v_stat" in hints else v_stat()) if group == "sd2" else None
        v_pred = hints.get("prediction_type") == "v_prediction" or (stat is not None and stat > _V_PRED_STD_THRESHOLD)
        turbo, base = {"sd2": ("sd-turbo", "sd2-base"), "sdxl": ("sdxl-turbo", "sdxl-base")}[group]
        if group == "sd2" and v_pred:
            fam = FAMILIES["sd21-v"]
            assumed.append("v-prediction (768-v) from " + ("the weights" if stat is not None else
                                                           "the scheduler config"))
        elif turbo_source:
            fam = FAMILIES[turbo]
            assumed.append(f"{FAMILIES[turbo].title} from {turbo_source}")
        else:
            fam = FAMILIES[base]
            assumed.append(f"{FAMILIES[base].title}: the weights cannot tell it from {FAMILIES[turbo].title}")
    prediction = fam.prediction_type
    if prediction_type != "auto":
        if prediction_type != prediction:
            assumed.append(f"prediction type {prediction_type} (override; family default {prediction})")
        prediction = prediction_type
    elif hints and hints.get("prediction_type") and hints["prediction_type"] != prediction:
        prediction = hints["prediction_type"]
    if assumed:
        others = ", ".join(f for f in allowed if f != fam.name)
        log.info("%s: assumed %s; if images look wrong pass family=%s or prediction_type=...",
                 Path(str(path)).name, "; ".join(assumed), others or fam.name)
    return Detection(fam, prediction, group, tuple(assumed))


def _read_json(path: Path, folder: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(folder, f"is missing {path.relative_to(folder)}",
                              "Copy the complete diffusers folder (every component's config)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(path, "is not valid JSON", "Restore the file from the original model") from exc
    if not isinstance(data, dict):
        raise CheckpointError(path, f"holds a JSON {type(data).__name__}, not an object of settings",
                              "Restore the file from the original model")
    return data


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _unet_config(folder: Path) -> dict:
    """unet/config.json, checked for the fields detection reads (a garbage file is named, not misreported)."""
    path = folder / "unet" / "config.json"
    unet = _read_json(path, folder)
    fix = "Restore unet/config.json from the original model (it is the diffusers UNet2DConditionModel config)"
    context = unet.get("cross_attention_dim")
    if context is None:
        raise CheckpointError(path, "is not a UNet config: it has no cross_attention_dim", fix)
    if not (_whole(context) or (isinstance(context, list) and context and all(_whole(c) for c in context))):
        raise CheckpointError(path, f"has cross_attention_dim {context!r}, not a whole number", fix)
    if not _whole(unet.get("in_channels", 4)):
        raise CheckpointError(path, f"has in_channels {unet.get('in_channels')!r}, not a whole number", fix)
    return unet


def detect_folder(folder: Path, family: str = "auto", prediction_type: str = "auto") -> Detection:
    """Detect the family of a diffusers folder from its model_index and component configs."""
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise CheckpointError(folder, "is a folder without model_index.json, so it is not a diffusers model",
                              "Point at the folder that holds model_index.json, or at a single "
                              ".safetensors/.ckpt file")
    index = _read_json(index_path, folder)
    pipeline = str(index.get("_class_name", ""))
    unet = _unet_config(folder)
    te_entry = index.get("text_encoder") or [None, None]
    te_class = te_entry[1] if isinstance(te_entry, list) and len(te_entry) == 2 else None
    context = unet.get("cross_attention_dim")
    if unet.get("in_channels", 4) != 4:
        raise CheckpointError(folder, f"holds a {unet.get('in_channels')}-channel UNet (inpainting or edit "
                              "model), an unsupported architecture", "Use a text-to-image model")
    if "XL" in pipeline or unet.get("addition_embed_type") == "text_time":
        group = "sdxl-refiner" if te_class is None or index.get("requires_aesthetics_score") else "sdxl"
    elif te_class == "BertModel":
        group = "taiyi"
    elif te_class and te_class.startswith("CLIPText"):
        te = _read_json(folder / "text_encoder" / "config.json", folder)
        # OpenCLIP ViT-H (SD2) uses gelu; OpenAI CLIP ViT-L (SD1) uses quick_gelu.
        group = "sd2" if te.get("hidden_act") == "gelu" else "sd1"
        if te.get("hidden_size") != context:
            raise CheckpointError(folder, f"has an unknown architecture: UNet cross-attention width {context} "
                                  f"does not match the text encoder width {te.get('hidden_size')}",
                                  "Supported: " + ", ".join(GROUP_TITLES.values()))
    else:
        raise CheckpointError(folder, f"has an unknown architecture ({pipeline or 'no pipeline class'}, "
                              f"text encoder {te_class})", "Supported: " + ", ".join(GROUP_TITLES.values()))
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path, folder) if sched_path.exists() else {}
    hints = {"prediction_type": sched.get("prediction_type"), "turbo": sched.get("timestep_spacing") == "trailing",
             "v_stat": None}
    return _choose_family(folder, group, family, prediction_type, lambda: None, hints=hints)


def family_of_pipeline(pipe) -> Family:
    """The family a diffusers pipeline's components match (turbo variants look like their base models).

    For pipelines handed to the public `apply_<technique>` helpers, which were not loaded by SDAccel.
    """
    name = type(pipe).__name__
    if name.startswith("StableDiffusionXL"):
        return FAMILIES["sdxl-refiner" if getattr(pipe, "text_encoder", None) is None else "sdxl-base"]
    if "Bert" in type(getattr(pipe, "text_encoder", None)).__name__:
        return FAMILIES["taiyi"]
    if getattr(pipe.text_encoder.config, "hidden_act", "quick_gelu") == "gelu":  # OpenCLIP ViT-H, not CLIP L
        v_pred = getattr(pipe.scheduler.config, "prediction_type", "epsilon") == "v_prediction"
        return FAMILIES["sd21-v" if v_pred else "sd2-base"]
    return FAMILIES["sd15"]
