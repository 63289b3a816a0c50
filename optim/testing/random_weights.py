"""Random-weight models in the real architectures and key layouts, for tests and benchmarks.

No weights can be downloaded here, and none are committed: tests write tiny checkpoints of every
family at test time (LDM single file, fp16 or fp32, .safetensors or .ckpt, or a diffusers folder)
so the real loading code runs; benchmarks build the full-size architecture, whose cost does not
depend on the weight values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..models.detect import (
    REFINER_OPENCLIP_PREFIX,
    SD1_CLIP_PREFIX,
    SD2_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    XL_CLIP_PREFIX,
    XL_OPENCLIP_PREFIX,
)
from ..models.families import FAMILIES, Family, get_family

_TINY_VAE = {"block_out_channels": [32, 32, 64, 64], "norm_num_groups": 8, "sample_size": 64}
_TINY_SD_UNET = {"block_out_channels": [32, 32, 64, 64], "norm_num_groups": 8, "sample_size": 8}
_TINY_CLIP = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
              "projection_dim": 32}
# SDXL's two text encoders must differ in width: diffusers tells them apart by it.
_TINY_OPENCLIP_SD2 = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "projection_dim": 32}
_TINY_OPENCLIP_XL = {"hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "projection_dim": 64}
_TINY_BERT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}

TINY_OVERRIDES: dict[str, dict[str, dict]] = {
    "sd1": {"unet": dict(_TINY_SD_UNET, cross_attention_dim=32), "text_encoder": _TINY_CLIP},
    "taiyi": {"unet": dict(_TINY_SD_UNET, cross_attention_dim=32), "text_encoder": _TINY_BERT},
    "sd2": {"unet": dict(_TINY_SD_UNET, cross_attention_dim=48, attention_head_dim=[2, 2, 4, 4]),
            "text_encoder": _TINY_OPENCLIP_SD2},
    "sdxl": {"unet": {"block_out_channels": [32, 64, 64], "norm_num_groups": 8, "sample_size": 8,
                      "attention_head_dim": [2, 4, 4], "transformer_layers_per_block": [1, 1, 2],
                      "cross_attention_dim": 96, "addition_time_embed_dim": 8,
                      "projection_class_embeddings_input_dim": 6 * 8 + 64},
             "text_encoder": _TINY_CLIP, "text_encoder_2": _TINY_OPENCLIP_XL},
    "sdxl-refiner": {"unet": {"block_out_channels": [32, 64, 64, 64], "norm_num_groups": 8, "sample_size": 8,
                              "attention_head_dim": [2, 4, 4, 4], "transformer_layers_per_block": 1,
                              "cross_attention_dim": 64, "addition_time_embed_dim": 8,
                              "projection_class_embeddings_input_dim": 5 * 8 + 64},
                     "text_encoder_2": _TINY_OPENCLIP_XL},
}


def component_config(fam: Family, name: str, tiny: bool) -> dict:
    """The family's shipped config for component `name`, shrunk when `tiny`."""
    config = json.loads((fam.config_dir / name / "config.json").read_text(encoding="utf-8"))
    if tiny:
        overrides = TINY_OVERRIDES[fam.group]
        config.update(_TINY_VAE if name == "vae" else overrides.get(name, {}))
    return config


def _fill_random_(module, generator, pool_size: int = 1 << 20) -> None:
    """Seeded random weights with sane scales: norms near 1, biases near 0, weights ~ 1/sqrt(fan_in).

    Large tensors are filled from a shared random pool at random offsets, which costs a copy instead
    of a random draw per element (a full SDXL UNet fills in seconds); small tensors draw directly.
    """
    import torch

    pool = torch.randn(pool_size, generator=generator)
    with torch.no_grad():
        for name, param in module.named_parameters():
            n = param.numel()
            flat = param.view(-1)
            if n <= pool_size // 4:
                flat.copy_(torch.randn(n, generator=generator))
            else:
                pos = int(torch.randint(0, pool_size, (1,), generator=generator))
                done = 0
                while done < n:
                    take = min(pool_size - pos, n - done)
                    flat[done: done + take].copy_(pool[pos: pos + take])
                    done += take
                    pos = 0
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name.lower() or "ln_" in name or "LayerNorm" in name
            if leaf == "bias":
                param.mul_(0.02)
            elif is_norm and param.ndim == 1:
                param.mul_(0.1).add_(1.0)
            else:
                fan_in = max(1, n // param.shape[0]) if param.ndim > 1 else n
                param.mul_(1.0 / math.sqrt(fan_in))


def _reset_known_buffers(module) -> None:
    """Recreate the index buffers transformers keeps (meta construction leaves them empty)."""
    import torch

    for name, buf in list(module.named_buffers()):
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "position_ids":
            value = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
        elif leaf == "token_type_ids":
            value = torch.zeros(buf.shape, dtype=torch.long)
        else:
            raise RuntimeError(f"synthetic weights: do not know how to initialise buffer {name}")
        owner._buffers[leaf] = value


def _build_text_encoder(config: dict, tiny: bool):
    import torch
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if config.get("model_type") == "bert":
        cls, cfg = BertModel, BertConfig(**config)
    else:
        cfg = CLIPTextConfig(**config)
        cls = CLIPTextModelWithProjection if config["architectures"][0] == "CLIPTextModelWithProjection" else \
            CLIPTextModel
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cpu")
    _reset_known_buffers(model)
    return model.eval()


def build_components(family: str, *, tiny: bool = False, seed: int = 0, dtype=None) -> dict:
    """Every module of `family` with seeded random weights (full size unless `tiny`)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..models.loader import load_shipped_tokenizer

    fam = get_family(family)
    gen = torch.Generator().manual_seed(seed)
    comps: dict = {}
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        with torch.device("meta"):
            model = cls.from_config(component_config(fam, name, tiny))
        comps[name] = model.to_empty(device="cpu").eval()
    for name in fam.text_encoders:
        comps[name] = _build_text_encoder(component_config(fam, name, tiny), tiny)
    for name in ("unet", "vae") + fam.text_encoders:
        _fill_random_(comps[name], gen)
        if dtype is not None:
            comps[name].to(dtype)
    for name, spec in fam.tokenizers.items():
        comps[name] = load_shipped_tokenizer(spec)
    return comps


def build_pipeline(family: str, *, tiny: bool = False, seed: int = 0):
    """A ready diffusers pipeline of `family` with random weights."""
    from ..models.loader import assemble_pipeline, family_scheduler_config

    fam = get_family(family)
    comps = build_components(fam.name, tiny=tiny, seed=seed)
    return assemble_pipeline(fam, comps, family_scheduler_config(fam, fam.prediction_type))


# An SD 1.5 a host recognises as one: hosts fix the text encoder and VAE architectures and tell SD 1.5 from other
# UNets by its 320 base channels and 768-wide context, so only the UNet's depth shrinks (two levels, one layer
# each: about 1.2 GB of fp32 weights in all, a 64x64 image in well under a second per step on two cores).
HOST_SHAPED_SD15_UNET = {"block_out_channels": [320, 640], "layers_per_block": 1,
                         "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                         "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}


def build_host_shaped_sd15(seed: int = 0):
    """An SD 1.5 pipeline with the shipped text encoder and VAE and a shallow UNet (HOST_SHAPED_SD15_UNET)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..models.loader import assemble_pipeline, family_scheduler_config, load_shipped_tokenizer

    fam = get_family("sd15")
    gen = torch.Generator().manual_seed(seed)
    unet_config = dict(component_config(fam, "unet", False), **HOST_SHAPED_SD15_UNET)
    comps = {}
    for name, cls, config in (("unet", UNet2DConditionModel, unet_config),
                              ("vae", AutoencoderKL, component_config(fam, "vae", False))):
        with torch.device("meta"):
            comps[name] = cls.from_config(config).to_empty(device="cpu").eval()
    comps["text_encoder"] = _build_text_encoder(component_config(fam, "text_encoder", False), False)
    for name in ("unet", "vae", "text_encoder"):
        _fill_random_(comps[name], gen)
    for name, spec in fam.tokenizers.items():
        comps[name] = load_shipped_tokenizer(spec)
    return assemble_pipeline(fam, comps, family_scheduler_config(fam, fam.prediction_type))


def load_synthetic(ref):
    """LoadedModel for `synthetic:<family>` / `synthetic-tiny:<family>` refs."""
    from ..models.loader import LoadedModel, family_scheduler_config

    scheme, family = ref.path.split(":", 1)
    fam = get_family(family)
    if ref.family not in ("auto", fam.name):
        fam = get_family(ref.family)
    prediction = fam.prediction_type if ref.prediction_type == "auto" else ref.prediction_type
    pipe = build_pipeline(fam.name, tiny=scheme == "synthetic-tiny")
    config = family_scheduler_config(fam, prediction)
    pipe.scheduler = type(pipe.scheduler).from_config(config)
    return LoadedModel(pipe, fam, prediction, ref.path, "synthetic", config)


# ---------------------------------------------------------------- writers


def ldm_state_dict(pipe, family: str) -> dict:
    """The whole pipeline in the original single-file key layout, as A1111/ComfyUI users hold it."""
    import torch

    from . import ldm_layout as L

    fam = get_family(family)
    group = fam.group
    out = {UNET_PREFIX + k: v for k, v in L.unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    out.update({VAE_PREFIX + k: v for k, v in L.vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})

    def projection(te):
        gen = torch.Generator().manual_seed(1)
        width, embed = te.config.hidden_size, te.config.projection_dim
        return torch.randn(width, embed, generator=gen).to(next(te.parameters()).dtype) / math.sqrt(width)

    if group in ("sd1", "taiyi"):
        te = pipe.text_encoder
        body = (L.bert_to_ldm(te.state_dict(), te.config.max_position_embeddings) if group == "taiyi"
                else L.clip_to_ldm(te.state_dict(), te.config.max_position_embeddings))
        out.update({SD1_CLIP_PREFIX + k: v for k, v in body.items()})
    elif group == "sd2":
        te = pipe.text_encoder
        extra = None
        if te.config.num_hidden_layers == 23:  # real SD2 files carry OpenCLIP-H's unused 24th block
            extra = {k.split(".", 3)[3]: torch.randn_like(v.float()).to(v.dtype) * 0.02
                     for k, v in _strip(te.state_dict()).items() if k.startswith("encoder.layers.0.")}
        body = L.openclip_to_ldm(te.state_dict(), projection=projection(te), extra_layer=extra)
        out.update({SD2_OPENCLIP_PREFIX + k: v for k, v in body.items()})
    else:
        te2 = pipe.text_encoder_2
        body2 = L.openclip_to_ldm(te2.state_dict(), projection=te2.text_projection.weight.T.contiguous())
        if group == "sdxl":
            te = pipe.text_encoder
            out.update({XL_CLIP_PREFIX + k: v for k, v in
                        L.clip_to_ldm(te.state_dict(), te.config.max_position_embeddings).items()})
            out.update({XL_OPENCLIP_PREFIX + k: v for k, v in body2.items()})
        else:
            out.update({REFINER_OPENCLIP_PREFIX + k: v for k, v in body2.items()})
    if group in ("sd1", "taiyi", "sd2"):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        out["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    return out


def _strip(sd: dict) -> dict:
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}


def write_single_file(pipe, family: str, path, *, dtype: str = "float16") -> Path:
    """Write `pipe` as one LDM-layout file: .safetensors, or a plain-tensor .ckpt (Lightning-style)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = getattr(torch, dtype)
    sd = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in
          ldm_state_dict(pipe, family).items()}
    from ..run.files import atomic_path

    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp), metadata={"format": "pt"})
        else:
            torch.save({"state_dict": sd, "global_step": 0}, str(tmp))
    return path


def write_config_folder(pipe, family: str, path) -> Path:
    """Write the diffusers configs of `pipe` (no weights): the `config_dir` a non-standard checkpoint needs."""
    import shutil

    fam = get_family(family)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(fam.config_dir / "model_index.json", path / "model_index.json")
    for name in ("unet", "vae") + fam.text_encoders:
        module = getattr(pipe, name)
        (path / name).mkdir(exist_ok=True)
        if hasattr(module.config, "to_json_string"):
            (path / name / "config.json").write_text(module.config.to_json_string(), encoding="utf-8")
        else:
            module.save_config(str(path / name))
    (path / "scheduler").mkdir(exist_ok=True)
    pipe.scheduler.save_config(str(path / "scheduler"))
    return path


def write_diffusers_folder(pipe, path) -> Path:
    """Write `pipe` as a diffusers folder (model_index.json plus one folder per component)."""
    path = Path(path)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def write_checkpoint(family: str, path, *, tiny: bool = True, layout: str = "single", dtype: str = "float16",
                     seed: int = 0, pipe=None):
    """Write random weights of `family` in `layout` ("single" or "diffusers") and return a ModelRef to them.

    A tiny single file also gets a `<file>.config` folder with its shrunken architecture, referenced by
    the returned ModelRef's `config_dir` (full-size files use the shipped family configs).
    """
    from ..spec.model_ref import ModelRef

    fam = get_family(family)
    pipe = pipe if pipe is not None else build_pipeline(fam.name, tiny=tiny, seed=seed)
    override = fam.name if fam.group in ("sd2", "sdxl") else "auto"
    if layout == "diffusers":
        write_diffusers_folder(pipe, path)
        return ModelRef(path=str(path), family=override)
    path = write_single_file(pipe, fam.name, path, dtype=dtype)
    config_dir = write_config_folder(pipe, fam.name, str(path) + ".config") if tiny else ""
    return ModelRef(path=str(path), family=override, config_dir=str(config_dir))


__all__ = ["FAMILIES", "build_components", "build_pipeline", "write_checkpoint", "write_single_file",
           "write_diffusers_folder", "ldm_state_dict", "load_synthetic"]
