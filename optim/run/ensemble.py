"""SDXL base + refiner as an ensemble of expert denoisers, and the img2img refiner mode.

Ensemble (eDiff-I's idea, as in the SDXL report): the base model denoises the high-noise part of the
schedule, up to `switch_at` of it, and the refiner finishes the low-noise part from the very same
latent with its own conditioning (aesthetic-score micro-conditioning). One scheduler runs across
both experts, so the split is seamless. The seed study recommends switching at 0.9 rather than 0.8.

img2img mode: the base makes a full image, the refiner re-noises it a little and refines it
(weaker than the ensemble, but works with any base family).
"""

from __future__ import annotations

import torch

from ..spec.ensemble import EnsembleSpec
from ..spec.errors import ConfigError
from ..spec.pipeline import GenerationRequest, PipelineSpec
from .cache import PipelineCache, default_cache
from .sampler import InterruptFn, ProgressFn, RunResult, _Job, _plan, run


def _switch_index(timesteps, switch_at: float, train_steps: int) -> int:
    """Steps whose timestep lies above the cut belong to the base (diffusers' denoising_end rule)."""
    cutoff = int(round(train_steps - switch_at * train_steps))
    return sum(1 for t in timesteps if float(t) >= cutoff)


def run_ensemble(ensemble: EnsembleSpec, request: GenerationRequest, *, cache: PipelineCache | None = None,
                 progress: ProgressFn | None = None, should_interrupt: InterruptFn | None = None,
                 strict: bool = False) -> RunResult:
    """Base denoises the first `switch_at` of the schedule, the refiner the rest, from the same latent."""
    if not isinstance(ensemble, EnsembleSpec):
        raise ConfigError("ensemble", f"expected an EnsembleSpec, got {type(ensemble).__name__}",
                          "build one with EnsembleSpec.for_models(base, refiner, switch_at)")
    switch_at = ensemble.switch_at
    if request.is_img2img:
        raise ConfigError("GenerationRequest.init_image", "the expert ensemble is text-to-image",
                          "use run_refine_img2img to refine an existing image")
    cache = cache if cache is not None else default_cache()
    if cache.max_entries < 2:
        raise ConfigError("cache", "the ensemble needs two pipelines cached at once", "use max_entries >= 2")
    with cache.use(ensemble.base, strict=strict) as base:
        if base.family.name not in ("sdxl-base", "sdxl-turbo"):  # before the refiner loads
            raise ConfigError("base model", f"is {base.family.title}, not SDXL", "pass an SDXL base checkpoint")
        with cache.use(ensemble.refiner, strict=strict) as ref:
            return _run_experts(base, ref, request, switch_at, progress, should_interrupt)


def _run_experts(base, ref, request, switch_at, progress, should_interrupt) -> RunResult:
    """One schedule across both prepared pipelines; stats merged into the refiner's result."""
    if ref.family.name != "sdxl-refiner":
        raise ConfigError("refiner model", f"is {ref.family.title}, not the SDXL refiner",
                          "pass the SDXL refiner checkpoint (sd_xl_refiner_1.0)")
    plan = _plan(request, base.family)
    base_job, ref_job = _Job(base, plan), _Job(ref, plan)
    with torch.inference_mode(), base_job.running(), ref_job.running():
        base_cond = base_job.encode()
        ref_cond = ref_job.encode()
        scheduler, generators, latents, timesteps = base_job.initial_latents()
        total = len(timesteps)
        split = _switch_index(timesteps, switch_at, scheduler.config.num_train_timesteps)
        base_job.set_schedule(total)
        ref_job.set_schedule(total)
        latents = base_job.denoise(scheduler, generators, latents, timesteps[:split], base_cond, first=0,
                                   total=total, progress=progress, should_interrupt=should_interrupt)
        latents = ref_job.denoise(scheduler, generators, latents, timesteps[split:], ref_cond, first=split,
                                  total=total, progress=progress, should_interrupt=should_interrupt,
                                  stage="denoise_refiner")
        images = ref_job.decode(latents)
    result = ref_job.result(images, latents)
    stats, base_stats = result.stats, base_job.stats
    stats.mode = f"ensemble(switch_at={switch_at})"
    stats.family = f"{base_stats.family}+{stats.family}"
    stats.unet_calls += base_stats.unet_calls
    stats.unet_batch_sizes = base_stats.unet_batch_sizes + stats.unet_batch_sizes
    stats.stage_s = {**{f"base_{k}" if k == "text_encode" else k: v for k, v in base_stats.stage_s.items()},
                     **{f"refiner_{k}" if k == "text_encode" else k: v for k, v in stats.stage_s.items()}}
    stats.stage_peak_mem_mb = {**base_stats.stage_peak_mem_mb, **stats.stage_peak_mem_mb}
    stats.peak_mem_mb = max(stats.peak_mem_mb, base_stats.peak_mem_mb)
    stats.total_s = base_stats.total_s
    stats.steps_run = max(stats.steps_run, base_stats.steps_run)
    denoise_s = stats.stage_s.get("denoise", 0.0) + stats.stage_s.get("denoise_refiner", 0.0)
    stats.it_per_s = stats.steps_run / denoise_s if denoise_s else 0.0
    stats.notes.append(f"base ran steps 1-{split}, refiner steps {split + 1}-{total}")
    stats.counters = {**{f"base_{k}": v for k, v in base_stats.counters.items()}, **stats.counters}
    return result


def run_refine_img2img(base_spec: PipelineSpec, refiner: PipelineSpec | str, request: GenerationRequest, *,
                       strength: float = 0.3,
                       cache: PipelineCache | None = None, progress: ProgressFn | None = None,
                       should_interrupt: InterruptFn | None = None, strict: bool = False) -> tuple[RunResult,
                                                                                                RunResult]:
    """Base txt2img, then the refiner re-noises the image by `strength` and refines it. Returns both results."""
    cache = cache if cache is not None else default_cache()
    first = run(base_spec, request, cache=cache, progress=progress, should_interrupt=should_interrupt, strict=strict)
    refiner_spec = EnsembleSpec.for_models(base_spec, refiner).refiner
    refined = run(refiner_spec,
                  request.with_(init_image=first.images_tensor, strength=strength, width=first.stats.width,
                                height=first.stats.height), cache=cache, progress=progress,
                  should_interrupt=should_interrupt, strict=strict)
    return first, refined
