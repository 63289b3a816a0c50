"""LoRA files with random weights in kohya's format (what A1111 users and most model sites hold), for tests."""

from __future__ import annotations

from pathlib import Path


def _factors(module, is_conv: bool, rank: int, scale: float, gen):
    """Random (down, up) factors for a 3x3 convolution or a linear layer, drawn in that order."""
    import torch

    if is_conv:
        down = torch.randn(rank, module.in_channels, 3, 3, generator=gen) * scale
        return down, torch.randn(module.out_channels, rank, 1, 1, generator=gen) * scale
    down = torch.randn(rank, module.in_features, generator=gen) * scale
    return down, torch.randn(module.out_features, rank, generator=gen) * scale


def kohya_unet_lora(unet, path, *, rank: int = 4, seed: int = 0, scale: float = 0.05) -> Path:
    """A kohya-format LoRA (`lora_unet_<diffusers module path>.lora_down/.lora_up/.alpha`) over every 3x3
    convolution of the diffusers `unet`'s resnets and every attention query, so both conv and linear patching
    show in the image."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        is_conv = isinstance(module, torch.nn.Conv2d) and ".resnets." in name and module.kernel_size == (3, 3)
        is_query = isinstance(module, torch.nn.Linear) and name.endswith(".to_q")
        if not (is_conv or is_query):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        down, up = _factors(module, is_conv, rank, scale, gen)
        tensors[f"{key}.lora_down.weight"] = down.half()
        tensors[f"{key}.lora_up.weight"] = up.half()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank)).half()
    return _save(tensors, path, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})


_ATTENTION_LAYERS = (".to_q", ".q_proj", ".to_out.0", ".out_proj")  # what real LoRAs adapt (diffusers'
# own loader also needs an output projection to recognise a text encoder's layers)


def random_lora(pipe, path, *, fmt: str = "kohya", rank: int = 4, seed: int = 0, scale: float = 0.05,
                alpha: float | None = 2.0) -> Path:
    """A LoRA over `pipe`'s UNet (3x3 resnet convolutions, attention query and output projections) and the same
    projections of its text encoders, in kohya's names (`lora_unet_`, `lora_te_` or SDXL's `lora_te1_`/
    `lora_te2_`), kohya's with the UNet's original layer names (`ldm`: `lora_unet_input_blocks_4_1_...`, as
    kohya's SDXL LoRAs are), or diffusers/PEFT's (`unet.<path>.lora_A.weight`); `alpha` None writes none."""
    import torch

    from ..models.ldm_names import unet_key_to_ldm

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, prefix, name, model, module, is_conv in _adapted_layers(pipe):
        down, up = _factors(module, is_conv, rank, scale, gen)
        if fmt in ("kohya", "ldm"):
            layer = unet_key_to_ldm(name, model.config) if fmt == "ldm" and component == "unet" else name
            key = prefix + layer.replace(".", "_")
            names = (f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha")
        else:
            key = f"{component}.{name}"
            names = (f"{key}.lora_A.weight", f"{key}.lora_B.weight", f"{key}.alpha")
        tensors[names[0]], tensors[names[1]] = down.half(), up.half()
        if alpha is not None:
            tensors[names[2]] = torch.tensor(float(alpha)).half()
    return _save(tensors, path, {"ss_network_module": "networks.lora"} if fmt != "peft" else None)


def _adapted_layers(pipe):
    """(component, kohya prefix, the layer's name in LoRA files, its model, the module, whether a 3x3 conv) for the
    layers real LoRAs adapt: the UNet's 3x3 resnet convolutions, attention query and output projections, and the
    same projections of the text encoders (named with CLIP's `text_model.`, which transformers 5 dropped)."""
    import torch

    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    for component, prefix in prefixes.items():
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            is_conv = isinstance(module, torch.nn.Conv2d) and ".resnets." in name and module.kernel_size == (3, 3)
            is_attention = isinstance(module, torch.nn.Linear) and name.endswith(_ATTENTION_LAYERS)
            if not (is_conv or is_attention):
                continue
            if component != "unet" and not name.startswith("text_model."):
                name = "text_model." + name
            yield component, prefix, name, model, module, is_conv


def _save(tensors: dict, path, metadata) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _lycoris_factors(kind: str, out: int, inp: int, kernel: int, rank: int, tucker: bool, scale: float, gen) -> dict:
    """Random LyCORIS factors for a layer of `out` x `inp` (x kernel x kernel) in the shapes LyCORIS stores."""
    import torch

    def draw(*shape):
        return torch.randn(*shape, generator=gen) * scale

    spatial = kernel * kernel
    if kind == "loha":
        if tucker and kernel > 1:  # a Tucker core per side with its two factors
            factors = {}
            for side in ("1", "2"):
                factors[f"hada_t{side}"] = draw(rank, rank, kernel, kernel)
                factors[f"hada_w{side}_a"], factors[f"hada_w{side}_b"] = draw(rank, out), draw(rank, inp)
            return factors
        return {f"hada_w{s}_a": draw(out, rank) for s in ("1", "2")} | \
            {f"hada_w{s}_b": draw(rank, inp * spatial) for s in ("1", "2")}
    a, b = (2 if out % 2 == 0 else 1), (2 if inp % 2 == 0 else 1)  # kron(w1 (a x b), w2 (out/a x inp/b ...))
    c, d = out // a, inp // b
    factors = {"lokr_w1": draw(a, b)}
    if tucker and kernel > 1:
        return factors | {"lokr_t2": draw(rank, rank, kernel, kernel), "lokr_w2_a": draw(rank, c),
                          "lokr_w2_b": draw(rank, d)}
    return factors | {"lokr_w2_a": draw(c, rank), "lokr_w2_b": draw(rank, d * spatial)}


def random_lycoris(pipe, path, *, kind: str = "loha", rank: int = 4, seed: int = 0, scale: float = 0.1,
                   tucker: bool = False, alpha: float | None = 2.0) -> Path:
    """A LyCORIS LoHa or LoKr file in kohya's names over the layers `random_lora` adapts (UNet 3x3 resnet
    convolutions, attention query and output projections, the text encoders' too); `tucker` gives the
    convolutions Tucker factors (`hada_t1`/`hada_t2`, `lokr_t2`)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for _, prefix, name, _, module, is_conv in _adapted_layers(pipe):
        out, inp = module.weight.shape[:2]
        key = prefix + name.replace(".", "_")
        for role, value in _lycoris_factors(kind, out, inp, 3 if is_conv else 1, rank, tucker, scale, gen).items():
            tensors[f"{key}.{role}"] = value.half()
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha)).half()
    return _save(tensors, path, {"ss_network_module": "lycoris.kohya", "ss_network_args": f'{{"algo": "{kind}"}}'})
