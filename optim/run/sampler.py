"""`run(spec, request)`: txt2img and img2img over a prepared pipeline, with measured RunStats.

SDAccel drives the denoising loop itself (on top of the pipeline's own prompt encoder), so it can
time each stage, count every UNet call and its batch, stop cleanly between steps, and later change
the batch mid-run (CFG cutoff) or skip work (caches). Every image in a batch has its own CPU
generator seeded `seed + i`, so any image can be re-made alone, on any device.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..core.registry import RunContext, all_units
from ..models.families import Family
from ..models.schedulers import SCHEDULER_TITLES, make_scheduler, normalise_scheduler
from ..spec.ensemble import EnsembleSpec
from ..spec.errors import ConfigError, GenerationInterrupted
from ..spec.pipeline import GenerationRequest, PipelineSpec
from .cache import PipelineCache, PreparedPipeline, default_cache
from .guidance import guided_steps
from .stats import MemoryMonitor, RunStats, StageTimer

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
InterruptFn = Callable[[], bool]

_AESTHETIC_SCORE, _NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # SDXL refiner micro-conditioning defaults


@dataclass
class RunResult:
    """Images (PIL and a [B, H, W, 3] float tensor in 0..1 on the CPU), final latents and stats."""

    images: list
    images_tensor: torch.Tensor
    latents: torch.Tensor  # diffusers latent space (VAE latent times its scaling factor)
    stats: RunStats
    vae_scaling_factor: float = 1.0

    @property
    def vae_latents(self) -> torch.Tensor:
        """The raw VAE latent (what ComfyUI's LATENT holds)."""
        return self.latents / self.vae_scaling_factor


@dataclass
class _Plan:
    """A request with every family default filled in."""

    prompt: str
    negative: str
    width: int
    height: int
    steps: int
    cfg: float
    seed: int
    batch: int
    scheduler: str
    init: torch.Tensor | None
    strength: float
    cfg_cutoff: float
    cfg_cutoff_step: int | None

    def cfg_steps(self, total: int) -> int:
        """How many of the `total` steps run with guidance (the rest run the conditional pass only)."""
        return guided_steps(total, self.cfg, self.cfg_cutoff, self.cfg_cutoff_step)


def run(spec: PipelineSpec | EnsembleSpec, request: GenerationRequest, *, cache: PipelineCache | None = None,
        progress: ProgressFn | None = None, should_interrupt: InterruptFn | None = None,
        strict: bool = False) -> RunResult:
    """Generate images for `request` with the pipeline `spec` describes (loaded/prepared once, cached).

    `progress(step, total)` is called after each step; `should_interrupt()` is polled before each step
    and, when true, stops the run with GenerationInterrupted, leaving the cached pipeline usable.
    An option this machine lacks falls back (one note in RunStats) unless `strict`, which raises.
    An `EnsembleSpec` runs the SDXL base and refiner as one schedule (`run.ensemble.run_ensemble`).
    """
    if isinstance(spec, EnsembleSpec):
        from .ensemble import run_ensemble

        return run_ensemble(spec, request, cache=cache, progress=progress, should_interrupt=should_interrupt,
                            strict=strict)
    cache = cache if cache is not None else default_cache()
    with cache.use(spec, strict=strict) as prepared:
        return generate(prepared, request, progress=progress, should_interrupt=should_interrupt)


def _plan(request: GenerationRequest, fam: Family) -> _Plan:
    init = None
    width, height = request.width, request.height
    if request.is_img2img:
        init = load_image_tensor(request.init_image)
        src_h, src_w = init.shape[-2:]
        width = width or max(64, src_w // 8 * 8)
        height = height or max(64, src_h // 8 * 8)
    width, height = width or fam.size, height or fam.size
    steps = request.steps or fam.steps
    cfg = fam.cfg if request.cfg is None else request.cfg
    scheduler = fam.scheduler if request.scheduler == "auto" else normalise_scheduler(request.scheduler)
    return _Plan(request.prompt, request.negative_prompt, width, height, steps, cfg, request.seed,
                 request.batch_size, scheduler, init, request.strength, request.cfg_cutoff,
                 request.cfg_cutoff_step)


MAX_SIDE = 4096  # GenerationRequest.width/height's limit, which an img2img source sets when they are empty
_INIT = "GenerationRequest.init_image"


def _check_side(width: int, height: int, what: str) -> None:
    if width > MAX_SIDE or height > MAX_SIDE or width < 1 or height < 1:
        raise ConfigError(_INIT, f"{what} is {width}x{height} pixels; the output size must lie within 64 and "
                          f"{MAX_SIDE}", f"resize the image to at most {MAX_SIDE} pixels a side (or set width "
                          "and height)")


def load_image_tensor(image) -> torch.Tensor:
    """A [B, 3, H, W] float tensor in 0..1 from a PIL image, a path, or an [H,W,3]/[B,H,W,3] 0..1 tensor.

    Sizes are checked before any pixel is decoded, so a huge source fails at once with a clear error."""
    if isinstance(image, (str, Path)):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(image) as img:
                _check_side(*img.size, what=f"the image {image}")
                image = img.convert("RGB")
        except Image.DecompressionBombError as exc:
            raise ConfigError(_INIT, f"{image} is too large to decode safely ({exc})",
                              f"resize it to at most {MAX_SIDE} pixels a side") from exc
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(_INIT, f"cannot read image {image}: {exc}", "pass a PNG/JPEG/WebP file") from exc
    if hasattr(image, "convert") and hasattr(image, "size"):
        import numpy as np

        _check_side(*image.size, what="the image")
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() == 4 and t.shape[-1] in (3, 4) and t.shape[1] not in (3, 4):
            t = t[..., :3].permute(0, 3, 1, 2)
        if t.dim() != 4 or t.shape[1] != 3 or t.numel() == 0:
            raise ConfigError(_INIT, f"tensor of shape {tuple(image.shape)} is not an image",
                              "pass [H, W, 3] or [B, H, W, 3] values in 0..1")
        _check_side(t.shape[-1], t.shape[-2], what="the image tensor")
        if not torch.isfinite(t).all():
            raise ConfigError(_INIT, "the image tensor holds NaN or infinite values",
                              "pass finite values in 0..1 (check the node that made it)")
        return t.clamp(0, 1).contiguous()
    raise ConfigError("GenerationRequest.init_image", f"unsupported type {type(image).__name__}",
                      "pass a PIL image, a file path or an image tensor")


def _generators(seed: int, batch: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed((seed + i) % 2**64) for i in range(batch)]


def _noise(shape, generators, device, dtype=torch.float32) -> torch.Tensor:
    """Per-image noise drawn on the CPU (same numbers on every device), then moved."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(device,
                                                                                                      dtype)


def _in_dtype(cond, dtype):
    """The conditioning (nested dicts of tensors) with its floating tensors in `dtype`."""
    if isinstance(cond, dict):
        return {key: _in_dtype(value, dtype) for key, value in cond.items()}
    if isinstance(cond, torch.Tensor) and cond.is_floating_point():
        return cond.to(dtype)
    return cond


def _encode_prompts(pipe, fam: Family, plan: _Plan, do_cfg: bool, device) -> dict:
    """Text embeddings (and SDXL pooled embeddings / time ids) ordered [negative, positive] under CFG."""
    negative = plan.negative or None
    if not fam.is_xl:
        cond, uncond = pipe.encode_prompt(plan.prompt, device, plan.batch, do_cfg, negative)
        embeds = torch.cat([uncond, cond]) if do_cfg else cond
        return {"encoder_hidden_states": embeds.to(device)}
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompt=plan.prompt, device=device, num_images_per_prompt=plan.batch,
        do_classifier_free_guidance=do_cfg, negative_prompt=negative)
    h, w = plan.height, plan.width
    if fam.name == "sdxl-refiner":
        ids, neg_ids = [h, w, 0, 0, _AESTHETIC_SCORE], [h, w, 0, 0, _NEGATIVE_AESTHETIC_SCORE]
    else:
        ids = neg_ids = [h, w, 0, 0, h, w]
    unet = pipe.unet
    expected = unet.add_embedding.linear_1.in_features
    got = unet.config.addition_time_embed_dim * len(ids) + pooled.shape[-1]
    if expected != got:
        raise ConfigError("model", f"SDXL conditioning width mismatch (UNet expects {expected}, text encoders give "
                          f"{got})", "check the family override (base vs refiner)")
    time_ids = torch.tensor([ids] * plan.batch, dtype=torch.float32)
    if do_cfg:
        neg_time_ids = torch.tensor([neg_ids] * plan.batch, dtype=torch.float32)
        embeds, pooled_all = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])
        time_ids = torch.cat([neg_time_ids, time_ids])
    else:
        embeds, pooled_all = cond, pooled
    return {"encoder_hidden_states": embeds.to(device),
            "added_cond_kwargs": {"text_embeds": pooled_all.to(device), "time_ids": time_ids.to(device)}}


class _UnetCallLog:
    """Counts UNet forward calls and their batch sizes through a hook removed after the run."""

    def __init__(self, unet):
        self.batch_sizes: list[int] = []
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        self.batch_sizes.append(int(sample.shape[0]))

    def close(self):
        self._handle.remove()


def vae_scale(vae) -> tuple[float, float]:
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def _latent_scale(prepared: PreparedPipeline) -> float:
    """The model's own VAE scaling factor (a Tiny VAE in `pipe.vae` says 1.0 for the same latent space)."""
    handle = prepared.handle("vae")
    factor = handle.info.get("latent_scaling_factor") if handle is not None else None
    return factor if factor is not None else vae_scale(prepared.pipe.vae)[0]


def _prepare_latents(pipe, plan: _Plan, scheduler, generators, device, monitor, timer):
    """Initial latents and the timesteps to run (all of them for txt2img, the tail for img2img)."""
    unet, vae = pipe.unet, pipe.vae
    channels = unet.config.in_channels
    shape = (channels, plan.height // 8, plan.width // 8)
    scheduler.set_timesteps(plan.steps, device=device)
    timesteps = scheduler.timesteps
    noise = _noise(shape, generators, device)
    if plan.init is None:
        return noise * scheduler.init_noise_sigma, timesteps
    order = getattr(scheduler, "order", 1)
    init_steps = min(int(plan.steps * plan.strength), plan.steps)
    t_start = max(plan.steps - init_steps, 0)
    timesteps = timesteps[t_start * order:]
    if len(timesteps) == 0:
        raise ConfigError("GenerationRequest.strength", f"strength {plan.strength} with {plan.steps} steps leaves "
                          "no step to run", "raise strength or steps")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * order)
    image = torch.nn.functional.interpolate(plan.init, size=(plan.height, plan.width), mode="bilinear",
                                            align_corners=False, antialias=True) if \
        tuple(plan.init.shape[-2:]) != (plan.height, plan.width) else plan.init
    if image.shape[0] == 1 and plan.batch > 1:
        image = image.expand(plan.batch, -1, -1, -1)
    elif image.shape[0] != plan.batch:
        raise ConfigError("GenerationRequest.init_image", f"{image.shape[0]} images for a batch of {plan.batch}",
                          "pass one image or exactly batch_size images")
    with timer.stage("encode_image"), monitor.stage("encode_image"):
        vae_device = device
        encoded = vae.encode((image * 2 - 1).to(vae_device, vae.dtype))
        dist = getattr(encoded, "latent_dist", None)
        if dist is None:  # deterministic encoders (Tiny VAE) return latents directly
            init_latents = encoded.latents.float().to(device)
        else:
            eps = _noise(dist.mean.shape[1:], _generators(plan.seed + 7919, plan.batch), vae_device, torch.float32)
            init_latents = (dist.mean.float() + dist.std.float() * eps).to(device)
    scale, shift = vae_scale(vae)
    init_latents = (init_latents - shift) * scale
    latent_t = timesteps[:1].repeat(plan.batch)
    return scheduler.add_noise(init_latents, noise, latent_t), timesteps


def _decode(vae, latents: torch.Tensor, device) -> torch.Tensor:
    scale, shift = vae_scale(vae)
    z = latents / scale + shift
    mean = getattr(vae.config, "latents_mean", None)
    if mean is not None:
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(z)
        z = z * std / scale + torch.tensor(mean).view(1, -1, 1, 1).to(z)
    image = vae.decode(z.to(device, vae.dtype), return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1), image


def _decode_checked(prepared: PreparedPipeline, latents: torch.Tensor, run: RunContext, device) -> torch.Tensor:
    """Decode; if a half-precision VAE overflowed (NaN/inf), decode again in fp32 and say so once."""
    from ..core.patching import PatchSet

    vae = prepared.pipe.vae
    images, raw = _decode(vae, latents, device)
    if torch.isfinite(raw).all() or vae.dtype == torch.float32:
        return images
    precision = prepared.spec.optimization("precision") if prepared.spec else None
    if precision is not None and not getattr(precision, "vae_auto_upcast", True):
        run.note(f"VAE decode in {str(vae.dtype).replace('torch.', '')} produced NaN/inf (auto upcast is off)")
        return images
    scope = PatchSet("vae_upcast")
    scope.convert_tensors(vae, dtype=torch.float32)
    try:
        images, _ = _decode(vae, latents, device)
    finally:
        scope.remove()
    run.note("VAE overflowed in half precision; re-decoded in fp32 (use the fp16-fix VAE to avoid the cost)")
    if not getattr(prepared, "_warned_vae_upcast", False):
        log.warning("%s: the half-precision VAE produced NaN/inf; decoded again in fp32", prepared.loaded.source)
        prepared._warned_vae_upcast = True
    run.count("vae_upcast_decodes")
    return images


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arrays = (images * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def _describe_optimizations(configs) -> list[str]:
    """Labels of the optimizations that were applied (after fallbacks), default precision left out."""
    return [cfg.label() for cfg in configs if cfg.kind != "precision" or cfg.changed()]


def enter_run_scopes(prepared: PreparedPipeline, run: RunContext, stack: ExitStack) -> None:
    """Enter every applied unit's per-run scope, in canonical order."""
    units = all_units()
    for handle in prepared.handles:
        cfg = handle.info.get("config")
        scope = units[handle.name].run_scope(cfg, handle, run) if cfg is not None else None
        if scope is not None:
            stack.enter_context(scope)


def _conditional_half(cond: dict, batch: int) -> dict:
    """The positive half of [negative, positive] conditioning, for steps after the CFG cutoff."""
    out = {"encoder_hidden_states": cond["encoder_hidden_states"][batch:]}
    if "added_cond_kwargs" in cond:
        out["added_cond_kwargs"] = {k: v[batch:] for k, v in cond["added_cond_kwargs"].items()}
    return out


class _Job:
    """One prepared pipeline working on one plan: stages, timing, memory, UNet calls and run scopes."""

    def __init__(self, prepared: PreparedPipeline, plan: _Plan):
        self.prepared, self.plan = prepared, plan
        self.pipe, self.fam = prepared.pipe, prepared.family
        self.device = torch.device(prepared.device)  # execution device (offloaded weights may live elsewhere)
        precision = prepared.handle("precision")
        self.stats = RunStats(
            family=self.fam.name, model=Path(prepared.loaded.source).name, device=str(prepared.device),
            dtypes=dict(precision.info.get("dtypes", {})) if precision else {},
            optimizations=_describe_optimizations(prepared.applied),
            applied=[{"kind": cfg.kind, **cfg.to_dict()} for cfg in prepared.applied],
            mode="img2img" if plan.init is not None else "txt2img", width=plan.width, height=plan.height,
            batch_size=plan.batch, scheduler=SCHEDULER_TITLES[plan.scheduler], steps=plan.steps, cfg=plan.cfg,
            cache=prepared.status, prepare_s=prepared.prepare_s)
        self.stats.notes.extend(prepared.notes)
        if prepared.loras is not None and prepared.loras.lines:
            self.stats.notes.extend(prepared.loras.lines)
            if prepared.status != "hit":
                self.stats.notes.append(f"LoRAs merged in {prepared.loras.switch_s:.2f} s (no checkpoint read)")
        if self.fam.turbo and plan.steps > (self.fam.max_steps_hint or plan.steps):
            self.stats.notes.append(f"{self.fam.title} is distilled for 1-{self.fam.max_steps_hint} steps")
        self.monitor, self.timer = MemoryMonitor(prepared.device), StageTimer(prepared.device)
        self.do_cfg = plan.cfg > 1.0
        self.run = RunContext(pipe=self.pipe, family=self.fam, device=self.device, steps=plan.steps,
                              batch=plan.batch, cfg_steps=0)

    @contextmanager
    def stage(self, name: str):
        with self.timer.stage(name), self.monitor.stage(name), self.run.stage(name):
            yield

    @contextmanager
    def running(self):
        """Run scopes and bookkeeping around the whole job; stats are filled in even if it fails."""
        calls = _UnetCallLog(self.pipe.unet)
        start = time.perf_counter()
        try:
            with ExitStack() as scopes:
                enter_run_scopes(self.prepared, self.run, scopes)
                yield self
        finally:
            calls.close()
            stats, run = self.stats, self.run
            stats.unet_calls = len(calls.batch_sizes)
            stats.unet_batch_sizes = list(calls.batch_sizes)
            stats.cfg_steps = run.cfg_steps
            stats.stage_s = {k: round(v, 4) for k, v in self.timer.times.items()}
            stats.total_s = time.perf_counter() - start
            stats.stage_peak_mem_mb = {k: round(v, 1) for k, v in self.monitor.stage_peaks.items()}
            stats.peak_mem_mb = round(self.monitor.peak_mb, 1)
            stats.mem_kind = self.monitor.kind
            stats.notes.extend(n for n in run.notes if n not in stats.notes)
            stats.counters = dict(run.counters)
            denoise_s = stats.stage_s.get("denoise", 0.0)
            stats.it_per_s = stats.steps_run / denoise_s if denoise_s > 0 else 0.0

    def encode(self) -> dict:
        with self.stage("text_encode"):
            return _encode_prompts(self.pipe, self.fam, self.plan, self.do_cfg, self.device)

    def initial_latents(self):
        scheduler = make_scheduler(self.plan.scheduler, self.prepared.loaded.scheduler_config, turbo=self.fam.turbo)
        generators = _generators(self.plan.seed, self.plan.batch)
        announce = self.run.stage("encode_image") if self.plan.init is not None else nullcontext()
        with announce:  # only img2img needs the VAE before denoising
            latents, timesteps = _prepare_latents(self.pipe, self.plan, scheduler, generators, self.device,
                                                  self.monitor, self.timer)
        return scheduler, generators, latents, timesteps

    def set_schedule(self, total: int) -> None:
        self.run.steps = total
        self.run.cfg_steps = self.plan.cfg_steps(total)

    def denoise(self, scheduler, generators, latents, timesteps, cond, *, first: int, total: int,
                progress: ProgressFn | None, should_interrupt: InterruptFn | None, stage: str = "denoise"):
        """Steps `first .. first+len(timesteps)-1` of `total`, on this job's UNet."""
        plan, run = self.plan, self.run
        guided_until = run.cfg_steps
        unet = self.pipe.unet
        unet_dtype = unet.dtype
        cond = _in_dtype(cond, unet_dtype)  # the text encoders may run in another precision than the UNet
        uncond_free = _conditional_half(cond, plan.batch) if self.do_cfg and guided_until < total else cond

        def busy(what: str, done: int, of: int) -> None:  # a unit's first-use work inside a step: interruptible
            if should_interrupt is not None and should_interrupt():
                raise GenerationInterrupted(run.step, total)

        run.busy_listeners.append(busy)
        try:
            with self.stage(stage):
                for offset, t in enumerate(timesteps):
                    i = first + offset
                    if should_interrupt is not None and should_interrupt():
                        raise GenerationInterrupted(i, total)
                    run.step = i
                    guided = i < guided_until
                    model_in = torch.cat([latents] * 2) if guided else latents
                    model_in = scheduler.scale_model_input(model_in, t)
                    step_cond = cond if guided or not self.do_cfg else uncond_free
                    noise_pred = unet(model_in.to(unet_dtype), t, return_dict=False, **step_cond)[0].float()
                    if guided:
                        uncond, text = noise_pred.chunk(2)
                        noise_pred = uncond + plan.cfg * (text - uncond)
                    latents = scheduler.step(noise_pred, t, latents, generator=generators, return_dict=False)[0]
                    self.stats.steps_run = i + 1
                    if progress is not None:
                        progress(i + 1, total)
        finally:
            run.busy_listeners.remove(busy)
        return latents

    def decode(self, latents):
        with self.stage("decode"):
            images = _decode_checked(self.prepared, latents, self.run, self.device)
        return images.permute(0, 2, 3, 1).cpu().contiguous()

    def result(self, images_hwc, latents) -> RunResult:
        return RunResult(_to_pil(images_hwc), images_hwc, latents.detach().float().cpu(), self.stats,
                         _latent_scale(self.prepared))


def encode_prompts(prepared: PreparedPipeline, prompt: str, negative: str, width: int, height: int, *,
                   guidance: bool) -> dict:
    """One image's prompt conditioning ([negative, positive] rows when `guidance`), as a run would encode it
    (streams encode once and reuse it)."""
    request = GenerationRequest(prompt=prompt, negative_prompt=negative, width=width, height=height)
    return _encode_prompts(prepared.pipe, prepared.family, _plan(request, prepared.family), guidance,
                           torch.device(prepared.device))


def decode_latents(prepared: PreparedPipeline, latents: torch.Tensor, run: RunContext) -> torch.Tensor:
    """Latents (diffusers' scale) to [B, H, W, 3] images in 0..1 on the CPU, with the half-precision VAE check."""
    images = _decode_checked(prepared, latents, run, torch.device(prepared.device))
    return images.permute(0, 2, 3, 1).cpu().contiguous()


def generate(prepared: PreparedPipeline, request: GenerationRequest, *, progress: ProgressFn | None = None,
             should_interrupt: InterruptFn | None = None) -> RunResult:
    """Run one request on an already prepared pipeline."""
    job = _Job(prepared, _plan(request, prepared.family))
    with torch.inference_mode(), job.running():
        cond = job.encode()
        scheduler, generators, latents, timesteps = job.initial_latents()
        job.set_schedule(len(timesteps))
        latents = job.denoise(scheduler, generators, latents, timesteps, cond, first=0, total=len(timesteps),
                              progress=progress, should_interrupt=should_interrupt)
        images = job.decode(latents)
    return job.result(images, latents)
