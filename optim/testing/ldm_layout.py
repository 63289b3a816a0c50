"""Write diffusers/transformers weights in the original single-file (LDM / generative-models) key layout.

This is the inverse of diffusers' single-file converters. SDAccel uses it to write test and
benchmark checkpoints exactly as A1111/ComfyUI users hold them, so the real loading path is
exercised; a round-trip test proves the two directions agree key for key and value for value.
"""

from __future__ import annotations

import torch

from ..models.ldm_names import unet_key_to_ldm

_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def unet_to_ldm(sd: dict, config) -> dict:
    """diffusers UNet2DConditionModel state dict -> openaimodel.UNetModel keys (no prefix)."""
    return {unet_key_to_ldm(key, config): value for key, value in sd.items()}


def _vae_block(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_to_ldm(sd: dict, config) -> dict:
    """diffusers AutoencoderKL state dict -> ldm AutoencoderKL keys (no prefix)."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        sub = parts[1]
        if sub in ("conv_in", "conv_out"):
            out[key] = value
        elif sub == "conv_norm_out":
            out[f"{side}.norm_out.{parts[-1]}"] = value
        elif sub in ("down_blocks", "up_blocks"):
            i, kind = int(parts[2]), parts[3]
            level = i if sub == "down_blocks" else levels - 1 - i
            group = "down" if sub == "down_blocks" else "up"
            if kind in ("downsamplers", "upsamplers"):
                name = "downsample" if kind == "downsamplers" else "upsample"
                out[f"{side}.{group}.{level}.{name}.conv.{parts[-1]}"] = value
            else:
                j, rest = int(parts[4]), ".".join(parts[5:])
                out[f"{side}.{group}.{level}.block.{j}.{_vae_block(rest)}"] = value
        elif sub == "mid_block":
            kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                out[f"{side}.mid.block_{j + 1}.{_vae_block(rest)}"] = value
            else:
                for new, old in _VAE_ATTN:
                    if rest.startswith(new + "."):
                        tail = rest[len(new) + 1:]
                        if tail == "weight" and value.ndim == 2:
                            value = value.reshape(*value.shape, 1, 1)  # LDM uses 1x1 convolutions
                        out[f"{side}.mid.attn_1.{old}.{tail}"] = value
                        break
                else:
                    raise KeyError(f"unexpected VAE attention key {key!r}")
        else:
            raise KeyError(f"unexpected VAE key {key!r}")
    return out


def _strip_text_model(sd: dict) -> dict:
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}


def clip_to_ldm(sd: dict, max_positions: int) -> dict:
    """transformers CLIPTextModel -> `transformer.text_model.*` as in SD1 / SDXL files (no prefix)."""
    out = {f"text_model.{k}": v for k, v in _strip_text_model(sd).items()}
    out["text_model.embeddings.position_ids"] = torch.arange(max_positions).unsqueeze(0)
    return out


def openclip_to_ldm(sd: dict, *, projection: torch.Tensor, extra_layer: dict | None = None) -> dict:
    """transformers CLIPTextModel(WithProjection) -> OpenCLIP `model.*` keys (no prefix).

    `projection` is OpenCLIP's `text_projection` ([width, embed]); `extra_layer` adds the final
    resblock SD2 files carry but do not use (diffusers keeps 23 of OpenCLIP-H's 24 layers).
    """
    sd = _strip_text_model(sd)
    out: dict = {}
    layers: dict[int, dict] = {}
    for key, value in sd.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("encoder.layers."):
            parts = key.split(".")
            layers.setdefault(int(parts[2]), {})[".".join(parts[3:])] = value
        elif key in ("text_projection.weight", "embeddings.position_ids"):
            continue
        else:
            raise KeyError(f"unexpected CLIP key {key!r}")
    if extra_layer is not None:
        layers[len(layers)] = extra_layer
    rename = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}
    for i, layer in layers.items():
        base = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[base + f"attn.in_proj_{kind}"] = torch.cat([layer[f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        for key, value in layer.items():
            if key.startswith("self_attn.") and key.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                continue
            name, kind = key.rsplit(".", 1)
            out[base + f"{rename[name]}.{kind}"] = value
    out["text_projection"] = projection
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def bert_to_ldm(sd: dict, max_positions: int) -> dict:
    """transformers BertModel -> `transformer.*` as in Taiyi's single file (no prefix)."""
    out = dict(sd)
    out["embeddings.position_ids"] = torch.arange(max_positions).unsqueeze(0)
    return out
