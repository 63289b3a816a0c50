"""FreeU's family values, DeepCache's schedule, shape safety and CFG-cutoff combination, and the
layer-by-layer UNet forward they rely on."""

from __future__ import annotations

import pytest
import torch
from sdaccel.optim.core.registry import ApplyContext, apply_all, remove_all
from sdaccel.optim.models.families import get_family
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec.errors import ConfigError
from sdaccel.optim.spec.model_ref import ModelRef
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.testing.random_weights import build_pipeline
from sdaccel.optim.units.deepcache.unet_layers import UNetLayers
from sdaccel.optim.units.deepcache.unit import DeepCacheConfig
from sdaccel.optim.units.freeu.unit import FreeUConfig

REQ = GenerationRequest(prompt="a harbour", width=64, height=64, steps=7, seed=2, scheduler="euler")


def _spec(family="sd15", *opts):
    spec = PipelineSpec(model=ModelRef.synthetic(family, tiny=True), device="cpu")
    for cfg in opts:
        spec = spec.with_optimization(cfg)
    return spec


def _inputs(unet, batch=2, hw=(8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *hw, generator=g)
    ehs = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled, generator=g), "time_ids": torch.randn(batch, 6,
                                                                                                 generator=g)}
    return x, ehs, added


@pytest.mark.parametrize("family", ["sd15", "sd2-base", "sdxl-base"])
@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])
@pytest.mark.parametrize("freeu", [False, True])
def test_layer_by_layer_forward_equals_the_diffusers_forward(family, hw, freeu):
    pipe = build_pipeline(family, tiny=True, seed=1)
    handles = apply_all(pipe, [FreeUConfig()], ApplyContext("cpu", get_family(family))) if freeu else []
    try:
        x, ehs, added = _inputs(pipe.unet, hw=hw)
        with torch.inference_mode():
            ref = pipe.unet(x, 321, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
            out, _ = UNetLayers(pipe.unet).forward(x, 321, ehs, added)
        assert torch.equal(out, ref)
    finally:
        remove_all(handles)


@pytest.mark.parametrize("family, expected", [("sd15", (0.9, 0.2, 1.5, 1.6)), ("taiyi", (0.9, 0.2, 1.5, 1.6)),
                                              ("sd21-v", (0.9, 0.2, 1.4, 1.6)), ("sdxl-base", (0.9, 0.2, 1.3, 1.4))])
def test_freeu_uses_the_published_values_per_family_and_overrides(family, expected, cache):
    result = run(_spec(family, FreeUConfig()), REQ.with_(steps=2), cache=cache)
    factors = cache.entries()[-1].handle("freeu").info["factors"]
    assert (factors["s1"], factors["s2"], factors["b1"], factors["b2"]) == expected
    assert result.stats.optimizations == ["freeu"]
    run(_spec(family, FreeUConfig(b1=1.1)), REQ.with_(steps=2), cache=cache)
    assert cache.entries()[-1].handle("freeu").info["factors"]["b1"] == 1.1


def test_freeu_changes_the_image_and_removal_restores_it(cache):
    base = run(_spec("sd15"), REQ, cache=cache)
    freeu = run(_spec("sd15", FreeUConfig()), REQ, cache=cache)
    again = run(_spec("sd15"), REQ, cache=cache)
    assert (base.images_tensor - freeu.images_tensor).abs().max() > 1e-3
    assert torch.equal(base.images_tensor, again.images_tensor)


def test_deepcache_interval_one_is_lossless(cache):
    base = run(_spec("sd15"), REQ, cache=cache)
    cached = run(_spec("sd15", DeepCacheConfig(cache_interval=1)), REQ, cache=cache)
    assert torch.equal(base.images_tensor, cached.images_tensor)
    assert cached.stats.counters == {"deepcache_full_steps": 7}


@pytest.mark.parametrize("family", ["sd15", "sd2-base", "sdxl-base", "taiyi"])
def test_deepcache_schedule_counts_and_fidelity(family, cache):
    base = run(_spec(family), REQ, cache=cache)
    result = run(_spec(family, DeepCacheConfig(cache_interval=3, cache_branch_id=0)), REQ, cache=cache)
    assert result.stats.counters["deepcache_full_steps"] == 3  # steps 0, 3, 6
    assert result.stats.counters["deepcache_cached_steps"] == 4
    assert result.stats.counters["deepcache_skipped_layers"] > 0
    assert any("DeepCache: 4 of 7" in n for n in result.stats.notes)
    diff = (result.images_tensor - base.images_tensor).abs()
    assert 0 < float(diff.mean()) < 0.25  # lossy, but the image is still the same image (random tiny model)


def test_deepcache_window_and_branch_limits(cache):
    result = run(_spec("sd15", DeepCacheConfig(cache_interval=2, start_step=2, end_step=6)), REQ, cache=cache)
    # full: 0, 1 (before start), 2, 4 (interval), 6 (at end); cached: 3, 5
    assert result.stats.counters["deepcache_full_steps"] == 5
    assert result.stats.counters["deepcache_cached_steps"] == 2
    with pytest.raises(ConfigError, match="cache_branch_id.*use 0\\.\\."):
        run(_spec("sd15", DeepCacheConfig(cache_branch_id=40)), REQ, cache=cache)


def test_deepcache_resets_per_run_and_on_shape_change(cache):
    spec = _spec("sd15", DeepCacheConfig(cache_interval=4))
    first = run(spec, REQ, cache=cache)
    wide = run(spec, REQ.with_(width=80), cache=cache)  # a new shape: no stale features
    assert wide.images[0].size == (80, 64)
    assert wide.stats.counters["deepcache_full_steps"] == 2
    again = run(spec, REQ, cache=cache)
    assert torch.equal(first.images_tensor, again.images_tensor)


def test_deepcache_combines_with_the_cfg_cutoff(cache):
    result = run(_spec("sd15", DeepCacheConfig(cache_interval=3)), REQ.with_(cfg_cutoff=0.5), cache=cache)
    assert result.stats.unet_batch_sizes == [2, 2, 2, 2, 1, 1, 1]
    assert result.stats.counters["deepcache_cached_steps"] == 4  # steps 4 and 5 reuse the conditional half
    sdxl = run(_spec("sdxl-base", DeepCacheConfig(cache_interval=2)), REQ.with_(cfg_cutoff=0.4), cache=cache)
    assert sdxl.stats.unet_batch_sizes == [2, 2, 2, 1, 1, 1, 1]


def test_deepcache_img2img_and_batches(cache):
    base = run(_spec("sd15"), REQ, cache=cache)
    result = run(_spec("sd15", DeepCacheConfig()), REQ.with_(init_image=base.images[0], strength=0.6,
                                                             batch_size=2), cache=cache)
    assert result.stats.mode == "img2img" and len(result.images) == 2
    assert result.stats.counters["deepcache_cached_steps"] >= 1
