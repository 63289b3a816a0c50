"""Running the engine for a sampler node: cache, progress, interrupt, memory, and what the node returns.

The engine does the work (`optim.run.sampler.run`, which runs an `EnsembleSpec` too); this module connects it
to ComfyUI: its progress bar and interrupt flag, its model manager (which may release our pipelines),
and its data types: IMAGE `[B, H, W, C]` floats in 0..1, LATENT `{"samples": raw VAE latent}`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..optim.spec.errors import GenerationInterrupted
from ..optim.spec.pipeline import GenerationRequest
from . import host
from .pipe import SDAccelPipe

if TYPE_CHECKING:  # the engine's run code (torch) is imported when a sampler first runs
    from ..optim.run.cache import PipelineCache
    from ..optim.run.sampler import RunResult
    from ..optim.run.stats import RunStats

log = logging.getLogger(__name__)

STATS_KEY = "sdaccel_stats"  # the node's UI output the frontend extension (js/) draws
KEEP_LOADED_TOOLTIP = ("Keep the prepared pipeline in memory for the next run (ComfyUI's Unload Models also "
                       "releases it). Off: release it after this run, at the cost of loading again next time")


def engine_cache() -> PipelineCache:
    """The process-wide prepared-pipeline cache the nodes share (one entry per checkpoint)."""
    from ..optim.run.cache import default_cache

    return default_cache()


def generate(pipe: SDAccelPipe, request: GenerationRequest, *, keep_loaded: bool = True) -> dict:
    """Run `request` on `pipe` and return the node's {"ui": ..., "result": (IMAGE, LATENT, STRING)}."""
    from ..optim.run.sampler import run

    cache = engine_cache()
    progress, should_interrupt = host.progress_callback(), host.interrupt_check()
    try:  # the engine loads outside ComfyUI's inference mode itself (see PipelineCache.prepare)
        result = run(pipe.spec, request, cache=cache, progress=progress, should_interrupt=should_interrupt)
    except GenerationInterrupted as exc:
        log.info("SDAccel: %s; the prepared pipeline stays loaded", exc)
        host.raise_interrupted(exc)
    finally:
        _settle_memory(cache, pipe, keep_loaded)
    return node_output(result, pipe, request)


def _settle_memory(cache: PipelineCache, pipe: SDAccelPipe, keep_loaded: bool) -> None:
    """Release what the user asked to release, then show ComfyUI's model manager what is still held."""
    used = [entry for entry in cache.entries() if entry.spec in pipe.specs()]
    if not keep_loaded:
        for entry in used:
            cache.release(entry)
        used = []
    host.BRIDGE.sync(cache, used)


def node_output(result: RunResult, pipe: SDAccelPipe, request: GenerationRequest) -> dict:
    """The node's return value. The UI payload carries the spec and request as data, so a workflow's run can
    be compared with the `bench` configuration it claims to reproduce (the source image is named, not sent)."""
    stats = result.stats
    applied = applied_toggles(stats, pipe)
    payload = {"lines": badge_lines(stats, applied), "summary": stats.summary_line(),
               "total_s": round(stats.total_s, 3), "it_per_s": round(stats.it_per_s, 3),
               "peak_mem_mb": stats.peak_mem_mb, "mem_kind": stats.mem_kind, "toggles": applied,
               "requested": pipe.toggles(), "notes": list(stats.notes), "spec": pipe.spec.to_dict(),
               "request": {**request.with_(init_image=None).to_dict(), "img2img": request.is_img2img}}
    latent = {"samples": result.vae_latents.contiguous()}
    return {"ui": {STATS_KEY: [payload]}, "result": (result.images_tensor, latent, stats_text(stats))}


def applied_toggles(stats: RunStats, pipe: SDAccelPipe) -> list[str]:
    """What ran (the engine's applied configs, after fallbacks, and the merged LoRAs), then the pipe's run settings
    and refiner switch."""
    from ..optim.spec.optimization import config_class
    from .pipe import shown_labels

    configs = [config_class(d["kind"])(**{k: v for k, v in d.items() if k != "kind"}) for d in stats.applied]
    return shown_labels(configs) + pipe.lora_labels() + pipe.run_toggles()


def stats_text(stats: RunStats) -> str:
    """The STRING output: the engine's one-line summary, then any fallback notes."""
    lines = [stats.summary_line()] + [f"note: {n}" for n in stats.notes]
    return "\n".join(lines)


def badge_lines(stats: RunStats, toggles: list[str]) -> list[str]:
    """What the sampler node shows after a run: time, speed, peak memory, toggles (the JS only draws these)."""
    memory = {"rss_high_water": "process RSS peak", "cuda_max_allocated": "CUDA max allocated"}.get(stats.mem_kind,
                                                                                                   stats.mem_kind)
    lines = [f"{stats.total_s:.2f} s  |  {stats.it_per_s:.2f} it/s  |  {stats.steps_run}/{stats.steps} steps",
             f"peak {stats.peak_mem_mb:.0f} MB ({memory})  |  {stats.device} {stats.dtypes.get('unet', '')}".rstrip(),
             "toggles: " + (", ".join(toggles) if toggles else "none")]
    lines.extend(f"note: {note}" for note in stats.notes[:3])
    return lines
