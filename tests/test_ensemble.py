"""SDXL base + refiner: the experts split one schedule from one latent, with the same toggles."""

from __future__ import annotations

import pytest
import torch
from sdaccel.optim.run.ensemble import run_ensemble, run_refine_img2img
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec.ensemble import EnsembleSpec
from sdaccel.optim.spec.errors import ConfigError
from sdaccel.optim.spec.model_ref import ModelRef
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.units.channels_last.unit import ChannelsLastConfig
from sdaccel.optim.units.deepcache.unit import DeepCacheConfig

BASE = PipelineSpec(model=ModelRef.synthetic("sdxl-base", tiny=True), device="cpu")
REFINER = ModelRef.synthetic("sdxl-refiner", tiny=True)
REQ = GenerationRequest(prompt="a snowy cabin", width=64, height=64, steps=10, seed=8, scheduler="euler")


def ensemble(base=BASE, refiner=REFINER, switch_at=0.9) -> EnsembleSpec:
    return EnsembleSpec.for_models(base, refiner, switch_at=switch_at)


def test_the_base_runs_the_high_noise_steps_and_the_refiner_the_rest(cache):
    result = run_ensemble(ensemble(), REQ, cache=cache)
    assert result.stats.unet_calls == 10 and result.stats.unet_batch_sizes == [2] * 10
    assert result.stats.steps_run == 10 and result.images[0].size == (64, 64)
    assert "base ran steps 1-9, refiner steps 10-10" in result.stats.notes
    assert {"denoise", "denoise_refiner", "decode"} <= set(result.stats.stage_s)
    early = run(ensemble(switch_at=0.5), REQ, cache=cache)
    assert "base ran steps 1-5, refiner steps 6-10" in early.stats.notes
    assert not torch.equal(early.latents, result.latents)


def test_switch_at_one_is_the_base_alone_on_the_same_latent(cache):
    alone = run(BASE, REQ, cache=cache)
    both = run_ensemble(ensemble(switch_at=1.0), REQ, cache=cache)
    assert torch.equal(alone.latents, both.latents)


def test_both_experts_get_the_same_toggles(cache):
    spec = BASE.with_optimization(ChannelsLastConfig()).with_optimization(DeepCacheConfig(cache_interval=2))
    assert ensemble(spec).refiner.optimizations == spec.optimizations
    result = run_ensemble(ensemble(spec, switch_at=0.6), REQ, cache=cache)
    prepared = {e.family.name: e for e in cache.entries()}
    for family in ("sdxl-base", "sdxl-refiner"):
        assert [h.name for h in prepared[family].handles] == ["precision", "channels_last", "deepcache"]
    assert result.stats.counters.get("deepcache_cached_steps", 0) >= 1
    assert result.stats.counters.get("base_deepcache_cached_steps", 0) >= 1


def test_wrong_models_and_values_are_refused(cache):
    sd15 = PipelineSpec(model=ModelRef.synthetic("sd15", tiny=True), device="cpu")
    loads = cache.loads
    with pytest.raises(ConfigError, match="not SDXL"):
        run_ensemble(ensemble(sd15), REQ, cache=cache)
    assert cache.loads == loads + 1  # refused before the refiner was loaded
    assert all(e.family.name != "sdxl-refiner" for e in cache.entries())
    with pytest.raises(ConfigError, match="not the SDXL refiner"):
        run_ensemble(ensemble(refiner=ModelRef.synthetic("sdxl-turbo", tiny=True)), REQ, cache=cache)
    with pytest.raises(ConfigError, match="switch_at"):
        ensemble(switch_at=1.5)
    with pytest.raises(ConfigError, match="EnsembleSpec"):
        run_ensemble(BASE, REQ, cache=cache)


def test_ensemble_spec_is_data_that_round_trips():
    spec = ensemble(BASE.with_optimization(ChannelsLastConfig()), switch_at=0.8)
    assert EnsembleSpec.from_json(spec.to_json()) == spec
    assert spec.with_optimization(DeepCacheConfig()).refiner.optimization("deepcache") == DeepCacheConfig()
    with pytest.raises(ConfigError, match="EnsembleSpec.base"):
        EnsembleSpec(base="x.safetensors")
    with pytest.raises(ConfigError, match="EnsembleSpec.colour"):
        EnsembleSpec.from_dict({"colour": 1})


def test_img2img_refiner_mode(cache):
    first, refined = run_refine_img2img(BASE, REFINER, REQ, strength=0.3, cache=cache)
    assert first.stats.mode == "txt2img" and refined.stats.mode == "img2img"
    assert refined.stats.family == "sdxl-refiner" and refined.stats.unet_calls == 3
    assert refined.images[0].size == first.images[0].size
