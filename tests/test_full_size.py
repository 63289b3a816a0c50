"""Full-size architectures: the shipped configs are the published ones, and a real-size SD1.5 checkpoint
in the A1111 layout loads offline through the same loader and generates."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import ALL_FAMILIES
from sdaccel.optim.models.families import get_family

# Published parameter counts (millions) of each component.
PUBLISHED_M = {
    ("sd15", "unet"): 859.52, ("sd15", "vae"): 83.65, ("sd15", "text_encoder"): 123.06,
    ("sd2-base", "unet"): 865.91, ("sdxl-base", "unet"): 2567.46, ("sdxl-base", "text_encoder_2"): 694.66,
    ("sdxl-refiner", "unet"): 2259.53, ("taiyi", "text_encoder"): 102.27,
}


def _meta_components(family):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    fam = get_family(family)
    out = {}
    with init_empty_weights():
        for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            out[name] = cls.from_config(json.loads((fam.config_dir / name / "config.json").read_text()))
        for name in fam.text_encoders:
            cfg = json.loads((fam.config_dir / name / "config.json").read_text())
            if cfg["model_type"] == "bert":
                out[name] = BertModel(BertConfig(**cfg))
            elif cfg["architectures"][0] == "CLIPTextModelWithProjection":
                out[name] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
            else:
                out[name] = CLIPTextModel(CLIPTextConfig(**cfg))
    return out


@pytest.mark.parametrize("family, component", sorted(PUBLISHED_M))
def test_shipped_configs_build_the_published_architectures(family, component):
    module = _meta_components(family)[component]
    millions = sum(p.numel() for p in module.parameters()) / 1e6
    assert millions == pytest.approx(PUBLISHED_M[(family, component)], abs=0.01)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_full_size_key_layout_round_trips_through_diffusers_converters(family):
    """Write every full-size family in the LDM layout (on the meta device) and convert it back."""
    from diffusers.loaders import single_file_utils as sfu
    from sdaccel.optim.models import detect
    from sdaccel.optim.testing import ldm_layout

    comps = _meta_components(family)
    unet_ldm = {detect.UNET_PREFIX + k: v for k, v in
                ldm_layout.unet_to_ldm(comps["unet"].state_dict(), comps["unet"].config).items()}
    back = sfu.convert_ldm_unet_checkpoint(unet_ldm, comps["unet"].config)
    assert {k: tuple(v.shape) for k, v in back.items()} == \
        {k: tuple(v.shape) for k, v in comps["unet"].state_dict().items()}
    vae_ldm = {detect.VAE_PREFIX + k: v for k, v in
               ldm_layout.vae_to_ldm(comps["vae"].state_dict(), comps["vae"].config).items()}
    back = sfu.convert_ldm_vae_checkpoint(vae_ldm, comps["vae"].config)
    assert {k: tuple(v.shape) for k, v in back.items()} == \
        {k: tuple(v.shape) for k, v in comps["vae"].state_dict().items()}
    for name in get_family(family).text_encoders:
        te = comps[name]
        expected = {k.removeprefix("text_model."): tuple(v.shape) for k, v in te.state_dict().items()
                    if not k.endswith("position_ids")}
        if te.config.model_type == "bert":
            continue  # Taiyi's BERT keeps transformers' own key names (loaded by SDAccel directly)
        if te.config.hidden_act == "quick_gelu":
            ldm = {"cond_stage_model.transformer." + k: v for k, v in
                   ldm_layout.clip_to_ldm(te.state_dict(), 77).items()}
            back = sfu.convert_ldm_clip_checkpoint(ldm)
        else:
            extra = None
            if te.config.num_hidden_layers == 23:
                extra = {k.removeprefix("text_model.").removeprefix("encoder.layers.0."): v
                         for k, v in te.state_dict().items()
                         if k.removeprefix("text_model.").startswith("encoder.layers.0.")}
            proj = torch.empty(te.config.hidden_size, te.config.projection_dim, device="meta")
            prefix = {"sd2": detect.SD2_OPENCLIP_PREFIX, "sdxl": detect.XL_OPENCLIP_PREFIX,
                      "sdxl-refiner": detect.REFINER_OPENCLIP_PREFIX}[get_family(family).group]
            ldm = {prefix + k: v for k, v in
                   ldm_layout.openclip_to_ldm(te.state_dict(), projection=proj, extra_layer=extra).items()}
            back = sfu.convert_open_clip_checkpoint(te, ldm, prefix=prefix)
        got = {k.removeprefix("text_model."): tuple(v.shape) for k, v in back.items()
               if not k.endswith("position_ids")}
        if "text_projection.weight" not in expected:
            got.pop("text_projection.weight", None)
        assert got == expected, (name, sorted(set(got) ^ set(expected))[:4])


@pytest.mark.slow
def test_full_size_sd15_a1111_checkpoint_loads_offline_and_generates(tmp_path, no_network, capsys):
    """About 2 GB of fp16 weights in the original key layout, written here, loaded by the real loader."""
    from sdaccel.optim.models.loader import load_model
    from sdaccel.optim.run.cache import PipelineCache
    from sdaccel.optim.run.sampler import generate
    from sdaccel.optim.spec.model_ref import ModelRef
    from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
    from sdaccel.optim.testing.random_weights import build_pipeline, write_single_file

    path = tmp_path / "v1-5-random-fp16.safetensors"
    pipe = build_pipeline("sd15", tiny=False, seed=0)
    write_single_file(pipe, "sd15", path, dtype="float16")
    reference = {k: v.to(torch.float16) for k, v in pipe.unet.state_dict().items()}
    del pipe
    size_gb = path.stat().st_size / 2**30
    assert 1.9 < size_gb < 2.2
    start = time.perf_counter()
    loaded = load_model(ModelRef(path=str(path)))
    load_s = time.perf_counter() - start
    assert loaded.family.name == "sd15" and loaded.format == "safetensors" and not loaded.assumed
    state = loaded.pipe.unet.state_dict()
    for key in ("conv_in.weight", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "up_blocks.3.resnets.2.conv2.weight", "mid_block.attentions.0.proj_out.weight"):
        assert torch.equal(state[key], reference[key]), key
    del loaded, state, reference
    cache = PipelineCache(max_entries=1)
    spec = PipelineSpec(model=ModelRef(path=str(path)))
    prepared = cache.prepare(spec)
    result = generate(prepared, GenerationRequest(prompt="a lighthouse", width=128, height=128, steps=1, seed=0))
    assert result.images[0].size == (128, 128) and result.stats.unet_calls == 1
    assert result.stats.dtypes["unet"] == "float32"
    assert no_network == []
    with capsys.disabled():
        print(f"\n[full-size sd15] {size_gb:.2f} GiB fp16 file loaded in {load_s:.1f}s; "
              f"{result.stats.summary_line()}")
