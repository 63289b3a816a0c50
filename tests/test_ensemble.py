"""SDXL base + refiner: the experts split one schedule from one latent, with the same toggles."""

from __future__ import annotations

import pytest
import torch

from sdaccel.optim.ensemble import refiner_spec_for, run_ensemble, run_refine_img2img
from sdaccel.optim.errors import ConfigError
from sdaccel.optim.models import ModelRef
from sdaccel.optim.sampler import run
from sdaccel.optim.spec import GenerationRequest, PipelineSpec
from sdaccel.optim.units.channels_last import ChannelsLastConfig
from sdaccel.optim.units.deepcache import DeepCacheConfig

BASE = PipelineSpec(model=ModelRef.synthetic("sdxl-base", tiny=True), device="cpu")
REFINER = ModelRef.synthetic("sdxl-refiner", tiny=True)
REQ = GenerationRequest(prompt="a snowy cabin", width=64, height=64, steps=10, seed=8, scheduler="euler")


def test_the_base_runs_the_high_noise_steps_and_the_refiner_the_rest(cache):
    result = run_ensemble(BASE, REFINER, REQ, switch_at=0.9, cache=cache)
    assert result.stats.unet_calls == 10 and result.stats.unet_batch_sizes == [2] * 10
    assert result.stats.steps_run == 10 and result.images[0].size == (64, 64)
    assert "base ran steps 1-9, refiner steps 10-10" in result.stats.notes
    assert {"denoise", "denoise_refiner", "decode"} <= set(result.stats.stage_s)
    early = run_ensemble(BASE, REFINER, REQ, switch_at=0.5, cache=cache)
    assert "base ran steps 1-5, refiner steps 6-10" in early.stats.notes
    assert not torch.equal(early.latents, result.latents)


def test_switch_at_one_is_the_base_alone_on_the_same_latent(cache):
    alone = run(BASE, REQ, cache=cache)
    ensemble = run_ensemble(BASE, REFINER, REQ, switch_at=1.0, cache=cache)
    assert torch.equal(alone.latents, ensemble.latents)


def test_both_experts_get_the_same_toggles(cache):
    spec = BASE.with_optimization(ChannelsLastConfig()).with_optimization(DeepCacheConfig(cache_interval=2))
    assert refiner_spec_for(spec, REFINER).optimizations == spec.optimizations
    result = run_ensemble(spec, REFINER, REQ, switch_at=0.6, cache=cache)
    prepared = {e.family.name: e for e in cache.entries()}
    for family in ("sdxl-base", "sdxl-refiner"):
        assert [h.name for h in prepared[family].handles] == ["precision", "channels_last", "deepcache"]
    assert result.stats.counters.get("deepcache_cached_steps", 0) >= 1
    assert result.stats.counters.get("base_deepcache_cached_steps", 0) >= 1


def test_wrong_models_and_values_are_refused(cache):
    sd15 = PipelineSpec(model=ModelRef.synthetic("sd15", tiny=True), device="cpu")
    with pytest.raises(ConfigError, match="not SDXL"):
        run_ensemble(sd15, REFINER, REQ, cache=cache)
    with pytest.raises(ConfigError, match="not the SDXL refiner"):
        run_ensemble(BASE, ModelRef.synthetic("sdxl-base", tiny=True).with_(path="synthetic-tiny:sdxl-turbo"),
                     REQ, cache=cache)
    with pytest.raises(ConfigError, match="switch_at"):
        run_ensemble(BASE, REFINER, REQ, switch_at=1.5, cache=cache)


def test_img2img_refiner_mode(cache):
    first, refined = run_refine_img2img(BASE, REFINER, REQ, strength=0.3, cache=cache)
    assert first.stats.mode == "txt2img" and refined.stats.mode == "img2img"
    assert refined.stats.family == "sdxl-refiner" and refined.stats.unet_calls == 3
    assert refined.images[0].size == first.images[0].size
