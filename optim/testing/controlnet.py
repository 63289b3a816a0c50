"""ControlNet files with random weights in the original LDM format (`control_model.` keys, what the ControlNet
1.x releases ship and ComfyUI's and A1111's loaders read), for tests."""

from __future__ import annotations

from pathlib import Path

# the hint encoder of the original ControlNet: 3x3 convolutions from the hint image's channels to the UNet's width
# (three of them with stride 2, so a hint at image size meets the latent)
_HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)


def ldm_controlnet(unet, path, *, seed: int = 0, hint_channels: int = 3, scale: float = 0.05) -> Path:
    """A ControlNet for the diffusers `unet` in LDM format: a copy of its encoder (input blocks, middle block,
    time embedding), a hint encoder and one 1x1 output convolution per skip. The output convolutions are random,
    not zero as in a fresh training run, so the residuals change the image."""
    import torch
    from safetensors.torch import save_file

    from .ldm_layout import unet_to_ldm

    gen = torch.Generator().manual_seed(seed)
    ldm = unet_to_ldm({k: v.detach().float() for k, v in unet.state_dict().items()}, unet.config)
    kept = ("input_blocks.", "middle_block.", "time_embed.", "label_emb.")
    tensors = {f"control_model.{k}": v.clone() for k, v in ldm.items() if k.startswith(kept)}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        tensors[f"control_model.{name}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * scale
        tensors[f"control_model.{name}.bias"] = torch.randn(cout, generator=gen) * scale

    channels = [hint_channels, *_HINT_CHANNELS, unet.config["block_out_channels"][0]]
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        conv(f"input_hint_block.{2 * i}", cin, cout, 3)  # a SiLU sits between each pair: odd indices
    for i, width in enumerate(_skip_widths(ldm)):
        conv(f"zero_convs.{i}.0", width, width, 1)
    middle = ldm["middle_block.2.out_layers.3.weight"].shape[0]
    conv("middle_block_out.0", middle, middle, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, str(path))
    return path


def _skip_widths(ldm: dict) -> list[int]:
    """The channels each input block hands to its skip (its last layer's output)."""
    widths, i = [], 0
    while any(k.startswith(f"input_blocks.{i}.") for k in ldm):
        for suffix in ("0.weight", "0.out_layers.3.weight", "0.op.weight"):
            if f"input_blocks.{i}.{suffix}" in ldm:
                widths.append(ldm[f"input_blocks.{i}.{suffix}"].shape[0])
                break
        else:
            raise KeyError(f"input block {i} has no layer whose width is known")
        i += 1
    return widths
