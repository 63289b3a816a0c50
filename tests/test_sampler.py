"""run(spec, request): txt2img/img2img, seeds, schedulers, Turbo defaults, RunStats, progress, interrupt."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_FAMILIES
from sdaccel.optim.models.schedulers import SCHEDULER_CHOICES
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec.errors import ConfigError, GenerationInterrupted
from sdaccel.optim.spec.model_ref import ModelRef
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.units.deepcache import DeepCacheConfig

BASE = GenerationRequest(prompt="a lighthouse at dawn", width=64, height=64, steps=3, seed=11, cfg=7.0)


def _spec(family: str) -> PipelineSpec:
    return PipelineSpec(model=ModelRef.synthetic(family, tiny=True), device="cpu")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_txt2img_every_family_returns_images_latents_and_stats(family, cache):
    prompt = "长城, 清晨, 朦胧, 唯美, 插画" if family == "taiyi" else "a lighthouse"
    result = run(_spec(family), BASE.with_(prompt=prompt, batch_size=2, width=72), cache=cache)
    assert len(result.images) == 2 and result.images[0].size == (72, 64)
    assert result.images_tensor.shape == (2, 64, 72, 3) and result.images_tensor.dtype == torch.float32
    assert 0.0 <= float(result.images_tensor.min()) and float(result.images_tensor.max()) <= 1.0
    assert result.latents.shape == (2, 4, 8, 9)
    torch.testing.assert_close(result.vae_latents * result.vae_scaling_factor, result.latents)
    stats = result.stats
    assert stats.family == family and stats.steps == stats.steps_run == 3
    assert stats.unet_calls == 3 and stats.unet_batch_sizes == [4, 4, 4]  # batch 2 x (cond, uncond)
    assert set(stats.stage_s) == {"text_encode", "denoise", "decode"} and all(v > 0 for v in stats.stage_s.values())
    assert stats.peak_mem_mb > 0 and stats.mem_kind == "rss_high_water"
    assert stats.it_per_s > 0 and stats.device == "cpu" and stats.dtypes["unet"] == "float32"
    assert family in stats.summary_line()


def test_same_seed_same_image_and_different_seed_different_image(cache):
    a = run(_spec("sd15"), BASE, cache=cache)
    b = run(_spec("sd15"), BASE, cache=cache)
    c = run(_spec("sd15"), BASE.with_(seed=12), cache=cache)
    assert torch.equal(a.images_tensor, b.images_tensor)
    assert (a.images_tensor - c.images_tensor).abs().max() > 0.05


def test_batch_image_i_is_the_single_image_of_seed_plus_i(cache):
    batch = run(_spec("sd15"), BASE.with_(batch_size=3), cache=cache)
    third = run(_spec("sd15"), BASE.with_(seed=BASE.seed + 2), cache=cache)
    # Batched and single convolutions round differently in the last bits; the image is the same.
    torch.testing.assert_close(batch.images_tensor[2], third.images_tensor[0], rtol=0, atol=1e-4)
    assert (batch.images_tensor[0] - batch.images_tensor[2]).abs().max() > 0.05


def test_negative_prompt_is_used_only_under_guidance(cache):
    plain = run(_spec("sd15"), BASE, cache=cache)
    negative = run(_spec("sd15"), BASE.with_(negative_prompt="fog, people"), cache=cache)
    assert (plain.images_tensor - negative.images_tensor).abs().max() > 1e-3
    off = run(_spec("sd15"), BASE.with_(cfg=1.0), cache=cache)
    off_neg = run(_spec("sd15"), BASE.with_(cfg=1.0, negative_prompt="fog, people"), cache=cache)
    assert torch.equal(off.images_tensor, off_neg.images_tensor)
    assert off.stats.unet_batch_sizes == [1, 1, 1]


@pytest.mark.parametrize("scheduler", [s for s in SCHEDULER_CHOICES if s != "auto"])
def test_every_scheduler_runs_deterministically(scheduler, cache):
    first = run(_spec("sd15"), BASE.with_(scheduler=scheduler), cache=cache)
    second = run(_spec("sd15"), BASE.with_(scheduler=scheduler), cache=cache)
    assert torch.equal(first.images_tensor, second.images_tensor)
    assert first.stats.unet_calls == 3


def test_schedulers_differ_from_each_other(cache):
    images = {s: run(_spec("sd15"), BASE.with_(scheduler=s), cache=cache).images_tensor
              for s in ("euler", "euler_a", "dpmpp_2m_karras", "ddim", "lcm", "tcd", "euler_trailing")}
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(images[a], images[b]), (a, b)


def test_few_step_schedulers_are_the_ones_distilled_models_need(cache):
    """LCM and TCD (LCM-LoRA, TCD-LoRA, Hyper-SD), and trailing timesteps (SDXL-Lightning, Hyper-SD: the first
    step starts at t=999, which the default leading spacing never reaches), by name and as A1111 spells them."""
    from diffusers import EulerDiscreteScheduler, LCMScheduler, TCDScheduler
    from sdaccel.optim.models.schedulers import make_scheduler, normalise_scheduler
    from sdaccel.webui.a1111 import _scheduler

    run(_spec("sd15"), BASE, cache=cache)
    config = cache.entries()[-1].loaded.scheduler_config
    expected = {"lcm": LCMScheduler, "tcd": TCDScheduler, "euler_trailing": EulerDiscreteScheduler}
    for name, cls in expected.items():
        assert type(make_scheduler(name, config)) is cls
    leading, trailing = make_scheduler("euler", config), make_scheduler("euler_trailing", config)
    leading.set_timesteps(4)
    trailing.set_timesteps(4)
    assert int(trailing.timesteps[0]) == 999 and int(leading.timesteps[0]) < 999
    ddim = make_scheduler("ddim_trailing", config)
    ddim.set_timesteps(4)
    assert int(ddim.timesteps[0]) == 999
    assert normalise_scheduler("Euler (trailing)") == "euler_trailing" and normalise_scheduler("LCM") == "lcm"
    assert _scheduler("Euler", "SGM Uniform") == "euler_trailing" and _scheduler("LCM", "Automatic") == "lcm"
    lcm = run(_spec("sd15"), BASE.with_(scheduler="lcm", cfg=1.0, steps=4), cache=cache)
    assert lcm.stats.scheduler == "LCM" and lcm.stats.unet_batch_sizes == [1] * 4  # CFG 1: no negative pass
    again = run(_spec("sd15"), BASE.with_(scheduler="lcm", steps=4, strength=0.5, init_image=lcm.images[0]),
                cache=cache)  # img2img on the LCM schedule: the tail of its timesteps
    assert again.stats.unet_calls == 2


@pytest.mark.parametrize("family", ["sdxl-turbo", "sd-turbo"])
def test_turbo_defaults_one_step_no_guidance_trailing(family, cache):
    result = run(_spec(family), GenerationRequest(prompt="a fox", width=64, height=64), cache=cache)
    assert result.stats.steps == 1 and result.stats.cfg == 0.0
    assert result.stats.unet_batch_sizes == [1]  # guidance 0: no negative pass
    assert result.stats.scheduler == "Euler a"
    from sdaccel.optim.models.schedulers import make_scheduler

    config = cache.entries()[-1].loaded.scheduler_config
    sched = make_scheduler("euler_a", config, turbo=True)
    sched.set_timesteps(1)
    assert int(sched.timesteps[0]) == 999  # trailing spacing starts at the last training step
    more = run(_spec(family), GenerationRequest(prompt="a fox", width=64, height=64, steps=6), cache=cache)
    assert any("1-4 steps" in n for n in more.stats.notes)


def test_v_prediction_family_runs_v_prediction(cache):
    result = run(_spec("sd21-v"), BASE, cache=cache)
    assert cache.entries()[-1].loaded.scheduler_config["prediction_type"] == "v_prediction"
    assert result.stats.family == "sd21-v"


def test_img2img_from_pil_tensor_and_file(cache, tmp_path):
    source = run(_spec("sd15"), BASE, cache=cache)
    pil = run(_spec("sd15"), BASE.with_(init_image=source.images[0], strength=0.7), cache=cache)
    assert pil.stats.mode == "img2img" and pil.stats.steps_run == 2  # int(3 * 0.7) steps of the tail
    tensor = run(_spec("sd15"), BASE.with_(init_image=source.images_tensor[0], strength=0.7), cache=cache)
    torch.testing.assert_close(pil.images_tensor, tensor.images_tensor, rtol=0, atol=2 / 255)
    path = tmp_path / "src.png"
    source.images[0].save(path)
    from_file = run(_spec("sd15"), BASE.with_(init_image=str(path), strength=0.7), cache=cache)
    assert torch.equal(from_file.images_tensor, pil.images_tensor)
    assert "encode_image" in pil.stats.stage_s


def test_img2img_strength_picks_the_tail_of_the_schedule(cache):
    from sdaccel.optim.models.schedulers import make_scheduler

    source = run(_spec("sd15"), BASE.with_(steps=6), cache=cache)
    unet = cache.entries()[-1].pipe.unet
    seen = []
    handle = unet.register_forward_pre_hook(lambda m, args: seen.append(float(args[1])))
    try:
        req = BASE.with_(steps=6, init_image=source.images[0], scheduler="euler")
        light = run(_spec("sd15"), req.with_(strength=0.34), cache=cache)
        light_t, seen[:] = list(seen), []
        full = run(_spec("sd15"), req.with_(strength=1.0), cache=cache)
        full_t = list(seen)
    finally:
        handle.remove()
    sched = make_scheduler("euler", cache.entries()[-1].loaded.scheduler_config)
    sched.set_timesteps(6)
    schedule = [float(t) for t in sched.timesteps]
    assert light.stats.unet_calls == 2 and full.stats.unet_calls == 6
    assert light_t == schedule[4:] and full_t == schedule


def test_img2img_size_defaults_to_the_source_and_batch_is_checked(cache):
    from PIL import Image

    src = Image.new("RGB", (83, 70), (200, 30, 30))
    result = run(_spec("sd15"), GenerationRequest(prompt="x", steps=2, init_image=src, strength=0.5), cache=cache)
    assert result.images[0].size == (80, 64)
    with pytest.raises(ConfigError, match="strength"):
        run(_spec("sd15"), GenerationRequest(prompt="x", steps=2, init_image=src, strength=0.1), cache=cache)
    with pytest.raises(ConfigError, match="init_image"):
        run(_spec("sd15"), BASE.with_(init_image=torch.rand(2, 64, 64, 3), batch_size=3), cache=cache)
    with pytest.raises(ConfigError, match="cannot read image"):
        run(_spec("sd15"), BASE.with_(init_image="/no/such.png"), cache=cache)


def test_progress_is_reported_every_step(cache):
    seen = []
    run(_spec("sd15"), BASE.with_(steps=4), cache=cache, progress=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_interrupt_stops_at_the_next_step_and_the_pipeline_stays_usable(cache):
    fresh = run(_spec("sd15"), BASE.with_(steps=5), cache=cache)
    calls = []

    def stop_after_two():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(GenerationInterrupted) as err:
        run(_spec("sd15"), BASE.with_(steps=5), cache=cache, should_interrupt=stop_after_two)
    assert err.value.step == 2 and err.value.total == 5
    unet = cache.entries()[-1].pipe.unet
    assert not unet._forward_pre_hooks  # the run's call-counting hook is gone
    again = run(_spec("sd15"), BASE.with_(steps=5), cache=cache)
    assert torch.equal(fresh.images_tensor, again.images_tensor)
    assert again.stats.cache == "hit"


def _unet_kwargs(unet, calls):
    return unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)


def test_sdxl_refiner_uses_aesthetic_conditioning(cache):
    """The refiner's time ids end in the aesthetic score: 2.5 for the negative half, 6.0 for the positive."""
    spec = _spec("sdxl-refiner")
    unet = cache.prepare(spec).pipe.unet
    calls = []
    hook = _unet_kwargs(unet, calls)
    try:
        result = run(spec, BASE, cache=cache)
    finally:
        hook.remove()
    assert result.stats.unet_batch_sizes == [2, 2, 2] and len(calls) == 3
    for kwargs in calls:
        time_ids = kwargs["added_cond_kwargs"]["time_ids"]
        assert time_ids.shape == (2, 5)  # original size (2), crop (2), aesthetic score: no target size
        assert time_ids[:, -1].tolist() == [2.5, 6.0]
        assert time_ids[:, :2].tolist() == [[64.0, 64.0], [64.0, 64.0]]


def _fresh_images(spec, request):
    from sdaccel.optim.run.cache import PipelineCache

    return run(spec, request, cache=PipelineCache(max_entries=1)).images_tensor


def test_interrupted_runs_report_nothing_half_done(cache):
    """No result, no hook or run scope left behind, and the cached pipeline gives the images a fresh one does."""
    spec = _spec("sd15")
    steps = []
    with pytest.raises(GenerationInterrupted):
        run(spec, BASE, cache=cache, should_interrupt=lambda: bool(steps), progress=lambda i, n: steps.append(i))
    assert steps == [1]  # stopped before the second step
    entry = cache.entries()[-1]
    assert not entry.pipe.unet._forward_pre_hooks and not entry.pipe.unet._forward_hooks
    again = run(spec, BASE, cache=cache)
    assert again.stats.cache == "hit" and torch.equal(again.images_tensor, _fresh_images(spec, BASE))


def test_a_run_failing_mid_denoise_leaves_the_cached_pipeline_usable(cache):
    """A failure that is not an interrupt (here the UNet raising on its second call) propagates as is, and the
    next run on the same cached pipeline is exact."""
    spec = _spec("sd15").with_optimization(DeepCacheConfig(cache_interval=2))
    unet = cache.prepare(spec).pipe.unet
    calls = []

    def fail_second(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory on purpose")

    hook = unet.register_forward_pre_hook(fail_second, with_kwargs=True)
    try:
        with pytest.raises(MemoryError, match="on purpose"):
            run(spec, BASE, cache=cache)
    finally:
        hook.remove()
    assert not unet._forward_pre_hooks
    again = run(spec, BASE, cache=cache)
    assert again.stats.cache == "hit" and torch.equal(again.images_tensor, _fresh_images(spec, BASE))


def test_concurrent_runs_on_one_cache_each_get_the_images_of_their_own_spec():
    """Host threads (ComfyUI's worker, the web UI, the API) share one cache: runs with different optimizations on
    one model, and an eviction between them, must never see each other's patches or half-loaded weights."""
    import threading

    from sdaccel.optim.run.cache import PipelineCache
    from sdaccel.optim.units.channels_last import ChannelsLastConfig
    from sdaccel.optim.units.freeu import FreeUConfig

    base = _spec("sd15")
    specs = {"plain": base, "freeu": base.with_optimization(FreeUConfig()),
             "deepcache": base.with_optimization(DeepCacheConfig(cache_interval=2)),
             "channels_last": base.with_optimization(ChannelsLastConfig())}
    alone = {name: _fresh_images(spec, BASE) for name, spec in specs.items()}
    assert not torch.equal(alone["plain"], alone["freeu"])  # the specs do differ in what they compute
    shared = PipelineCache(max_entries=1)
    results, errors = [], []
    start = threading.Barrier(len(specs) + 1)

    def worker(name):
        start.wait()
        try:
            for _ in range(2):
                results.append((name, run(specs[name], BASE, cache=shared).images_tensor))
        except BaseException as exc:  # noqa: BLE001 - reported below with the thread's name
            errors.append((name, exc))

    def evictor():
        start.wait()
        for _ in range(3):
            shared.evict(base.model)

    threads = [threading.Thread(target=worker, args=(name,)) for name in specs] + [threading.Thread(target=evictor)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert sorted(name for name, _ in results) == sorted(list(specs) * 2)
    for name, images in results:
        assert torch.equal(images, alone[name]), name
    assert len(shared) <= 1


def test_a_half_precision_unet_takes_full_precision_text_embeddings(cache):
    """UNet in bf16, text encoder in fp32 (the default beside `unet=half`): the conditioning follows the UNet."""
    from sdaccel.optim.units.precision.config import PrecisionConfig

    spec = _spec("sd15").with_optimization(PrecisionConfig(unet="bf16", text_encoder="fp32", allow_emulated=True))
    result = run(spec, BASE.with_(steps=2), cache=cache)
    assert result.stats.dtypes["unet"] == "bfloat16" and result.stats.dtypes["text_encoder"] == "float32"
    assert torch.isfinite(result.images_tensor).all()
