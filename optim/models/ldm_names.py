"""The original (LDM / generative-models) name of a diffusers UNet parameter or module.

diffusers' single-file converters go from the original layout to diffusers'; LoRA files trained on the
original layout (kohya's SDXL LoRAs name `input_blocks_4_1_...`) need the other direction, to find the
diffusers module each names. The test writers use the same mapping to write checkpoints as users hold them.
"""

from __future__ import annotations

_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _rename_resnet(rest: str) -> str:
    for new, old in _UNET_RESNET:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(f"unexpected UNet resnet key {rest!r}")


def unet_key_to_ldm(key: str, config) -> str:
    """`down_blocks.1.resnets.0.conv1.weight` -> `input_blocks.4.0.in_layers.2.weight` (a parameter's or a
    module's name, no prefix), for a UNet2DConditionModel with `config`; KeyError for a name it does not have."""
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError("per-block layers_per_block lists are not used by SD families")
    for head, ldm in _FIXED.items():
        if key == head or key.startswith(head + "."):
            return ldm + key[len(head):]
    parts = key.split(".")
    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv[.*]
            return ".".join([f"input_blocks.{(i + 1) * (lpb + 1)}.0.op", *parts[5:]])
        idx, rest = 1 + i * (lpb + 1) + int(parts[3]), ".".join(parts[4:])
        return f"input_blocks.{idx}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":  # up_blocks.i.upsamplers.0.conv[.*]
            slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
            return ".".join([f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv", *parts[5:]])
        idx, rest = i * (lpb + 1) + int(parts[3]), ".".join(parts[4:])
        return f"output_blocks.{idx}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * j}.{_rename_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    raise KeyError(f"unexpected UNet key {key!r}")
