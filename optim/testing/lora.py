"""LoRA files with random weights in kohya's format (what A1111 users and most model sites hold), for tests."""

from __future__ import annotations

from pathlib import Path


def kohya_unet_lora(unet, path, *, rank: int = 4, seed: int = 0, scale: float = 0.05) -> Path:
    """A kohya-format LoRA (`lora_unet_<diffusers module path>.lora_down/.lora_up/.alpha`) over every 3x3
    convolution of the diffusers `unet`'s resnets and every attention query, so both conv and linear patching
    show in the image."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        is_conv = isinstance(module, torch.nn.Conv2d) and ".resnets." in name and module.kernel_size == (3, 3)
        is_query = isinstance(module, torch.nn.Linear) and name.endswith(".to_q")
        if not (is_conv or is_query):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if is_conv:
            down = torch.randn(rank, module.in_channels, 3, 3, generator=gen) * scale
            up = torch.randn(module.out_channels, rank, 1, 1, generator=gen) * scale
        else:
            down = torch.randn(rank, module.in_features, generator=gen) * scale
            up = torch.randn(module.out_features, rank, generator=gen) * scale
        tensors[f"{key}.lora_down.weight"] = down.half()
        tensors[f"{key}.lora_up.weight"] = up.half()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank)).half()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return path
