"""The stream pipeline: frames in, images out, every frame taking the same few steps.

With Stream Batch, the frames in flight sit one per step ("slots"): each UNet call runs all of them as one batch
(slot k at the schedule's k-th timestep), the last slot leaves as an image and a new frame enters the first. The
batch keeps one shape from the first frame on (empty slots are filled), so compiled graphs are built once. Without
it, each frame runs its steps one after another. Both take the same arithmetic on the same fixed per-step noise,
so a frame's image is the same either way (to batching's rounding): the stream pre-computes the prompt embeddings,
that noise and the schedule's coefficients once.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field

from ..core.registry import RunContext
from ..spec.errors import ConfigError
from .guidance import guided, residual_noise, x0_estimate
from .schedule import stream_schedule
from .settings import StreamSettings
from .similarity import SimilarityFilter

_INCOMPATIBLE = {"deepcache": "DeepCache reuses deep features across one image's successive steps, and a stream "
                              "batch runs different frames' steps in one call",
                 "offload": "offloading moves the UNet and the VAE in and out for every frame"}


@dataclass
class StreamOutput:
    """One image leaving the stream: which frame it is, the image ([H, W, 3] floats in 0..1), whether the
    similarity filter skipped the frame (the image then repeats the last one), and its latency in seconds."""

    frame: int
    image: object
    skipped: bool = False
    latency_s: float = 0.0


@dataclass
class StreamStats:
    frames_in: int = 0
    frames_out: int = 0
    skipped: int = 0
    unet_calls: int = 0
    unet_rows: int = 0
    latencies_s: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def summary(self) -> dict:
        import statistics

        wall = time.perf_counter() - self.started
        lat = sorted(self.latencies_s)
        return {"frames_in": self.frames_in, "frames_out": self.frames_out, "skipped": self.skipped,
                "unet_calls": self.unet_calls, "unet_rows": self.unet_rows,
                "fps": round(self.frames_out / wall, 3) if wall > 0 else 0.0,
                "latency_p50_s": percentile(lat, 0.5), "latency_p95_s": percentile(lat, 0.95),
                "latency_mean_s": round(statistics.fmean(lat), 4) if lat else None}


def percentile(ordered: list, p: float):
    """The nearest-rank `p` quantile of sorted values (None for none), rounded to 0.1 ms."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))], 4)


@dataclass
class _Slot:
    """A frame in flight: its latent at its current step, and the x0 its residual guidance refers to."""

    frame: int
    latents: object
    reference: object  # x0 the virtual negative noise points to (self: the frame's latent; onetime: neg. x0)
    arrived: float


def _resolve_kind(settings: StreamSettings, family) -> str:
    if settings.scheduler != "auto":
        return settings.scheduler
    return "turbo" if family.turbo else "lcm"


def check_stream_spec(prepared) -> None:
    """Refuse units a stream cannot run under, naming the fix."""
    for handle in prepared.handles:
        cfg = handle.info.get("config")
        reason = _INCOMPATIBLE.get(handle.name)
        if reason and cfg is not None and (handle.name != "offload" or getattr(cfg, "mode", "none") != "none"):
            raise ConfigError(f"optimizations.{handle.name}", f"cannot run in a stream: {reason}",
                              f"remove {handle.name} from the stream's pipeline")


class StreamPipeline:
    """A prepared pipeline held for a stream. Use as a context manager (the units' run scopes stay entered
    for the whole stream), then `push` frames (img2img) or `push(None)` (txt2img), and `flush` at the end."""

    def __init__(self, prepared, settings: StreamSettings):
        import torch

        check_stream_spec(prepared)
        self.prepared, self.settings = prepared, settings
        self.pipe, self.family = prepared.pipe, prepared.family
        self.device = torch.device(prepared.device)
        self.kind = _resolve_kind(settings, self.family)
        if settings.cfg_mode == "self" and settings.txt2img:
            raise ConfigError("StreamSettings.cfg_mode", "self guidance needs an input frame (it is img2img's "
                              "residual guidance) and strength 1.0 is txt2img", "use onetime, full or none")
        self.schedule = stream_schedule(prepared.loaded.scheduler_config, steps=settings.steps,
                                        strength=settings.strength, kind=self.kind, device=self.device)
        self.guidance = settings.cfg_mode if settings.cfg > 0 or settings.cfg_mode == "none" else "none"
        self.stats = StreamStats()
        self.filter = SimilarityFilter(settings.similarity_threshold, settings.max_skip, settings.seed) \
            if settings.similarity_filter else None
        self._slots: list = [None] * (settings.steps - 1)  # slot k holds a latent at step k + 1
        self._last_image = None
        self._scopes: ExitStack | None = None
        self._prepared_embeddings = False

    # -- pre-computation --------------------------------------------------------------------------------

    def _precompute(self) -> None:
        import torch

        from ..run.sampler import encode_prompts

        s = self.settings
        embeds = encode_prompts(self.prepared, s.prompt, s.negative_prompt, s.width, s.height, guidance=True)
        unet = self.pipe.unet
        self._unet_dtype = unet.dtype
        self._negative = _rows(embeds, slice(0, 1), unet.dtype)
        self._positive = _rows(embeds, slice(1, 2), unet.dtype)
        channels = unet.config.in_channels
        self._latent_shape = (channels, s.height // 8, s.width // 8)
        gen = torch.Generator("cpu").manual_seed(s.seed)
        self._stage_noise = torch.randn((s.steps, *self._latent_shape), generator=gen).to(self.device)
        self._prepared_embeddings = True

    def __enter__(self):
        from ..run.sampler import enter_run_scopes

        self._scopes = ExitStack()
        self.run = RunContext(pipe=self.pipe, family=self.family, device=self.device, steps=self.settings.steps,
                              batch=self.settings.steps, cfg_steps=self.settings.steps if self.guidance == "full"
                              else 0)
        enter_run_scopes(self.prepared, self.run, self._scopes)
        import torch

        self._scopes.enter_context(torch.inference_mode())
        if not self._prepared_embeddings:
            self._precompute()
        return self

    def __exit__(self, *exc):
        scopes, self._scopes = self._scopes, None
        if scopes is not None:
            scopes.close()
        return False

    def describe(self, summary: dict) -> list[str]:
        """What a stream did (from `stats.summary()`, with the runner's dropped/errors/interrupted where present):
        the lines the CLI prints and the ComfyUI node shows."""
        s, p50, p95 = self.settings, summary["latency_p50_s"], summary["latency_p95_s"]
        lines = [f"{summary['frames_out']} frames out of {summary['frames_in']} in, {summary['fps']:.2f} fps, "
                 + (f"latency p50 {p50:.3f} s, p95 {p95:.3f} s" if p50 is not None else "no latency measured"),
                 f"{s.steps} steps ({self.kind}), guidance {self.guidance}, "
                 + ("stream batch" if s.stream_batch else "frame by frame") + f", {summary['unet_calls']} UNet calls"]
        extras = [f"{summary['skipped']} skipped as similar" if s.similarity_filter else "",
                  f"{summary['dropped']} dropped (queue full)" if summary.get("dropped") else "",
                  f"{summary['errors']} bad frames" if summary.get("errors") else "",
                  "interrupted" if summary.get("interrupted") else ""]
        if any(extras):
            lines.append(", ".join(extra for extra in extras if extra))
        return lines

    # -- frames -----------------------------------------------------------------------------------------

    def encode_frame(self, frame):
        """A [1, 3, H, W] 0..1 frame to its latent (the VAE's mean: the same frame gives the same latent)."""
        from ..run.sampler import vae_scale

        vae = self.pipe.vae
        encoded = vae.encode((frame * 2 - 1).to(self.device, vae.dtype))
        dist = getattr(encoded, "latent_dist", None)
        latents = (encoded.latents if dist is None else dist.mean).float()
        scale, shift = vae_scale(vae)
        return (latents - shift) * scale

    def decode(self, latents):
        from ..run.sampler import decode_latents

        return decode_latents(self.prepared, latents, self.run)[0]

    def _entering(self, frame_id: int, frame):
        """The slot a new frame starts as, at the first step."""
        import torch

        sched = self.schedule
        if frame is None:  # txt2img: pure noise of its own (seed + frame)
            gen = torch.Generator("cpu").manual_seed((self.settings.seed + 1 + frame_id) % 2**63)
            latents = torch.randn((1, *self._latent_shape), generator=gen).to(self.device)
            reference = torch.zeros_like(latents)
        else:
            reference = self.encode_frame(frame)
            latents = sched.noised(reference, self._stage_noise[:1], rows=slice(0, 1))
        return _Slot(frame_id, latents, reference, time.perf_counter())

    # -- one UNet call ------------------------------------------------------------------------------------

    def _unet(self, latents, rows, conditioning):
        """The UNet's output for `latents` at the schedule rows `rows` (a list of step indices)."""
        import torch

        self.stats.unet_calls += 1
        self.stats.unet_rows += latents.shape[0]
        timesteps = self.schedule.timesteps[rows]
        cond = _stack(conditioning, latents.shape[0])
        out = self.pipe.unet(latents.to(self._unet_dtype), timesteps, return_dict=False, **cond)[0]
        return out.float() if out.dtype != torch.float32 else out

    def _step(self, slots: list, steps: list):
        """Denoise each slot at its step (one batch): the denoised latents, and the onetime references."""
        import torch

        sched = self.schedule
        latents = torch.cat([slot.latents for slot in slots])
        index = torch.tensor(steps, device=self.device)
        alpha, sigma = sched.alpha[index], sched.sigma[index]
        mode, n = self.guidance, len(slots)
        references = None
        if mode == "full":
            out = self._unet(torch.cat([latents, latents]), steps + steps,
                             [self._negative] * n + [self._positive] * n)
            eps = sched.epsilon(torch.cat([latents, latents]), out, rows=torch.cat([index, index]))
            negative, positive = eps[:n], eps[n:]
        elif mode == "onetime":
            firsts = [i for i, step in enumerate(steps) if step == 0]
            extra = latents[firsts]
            out = self._unet(torch.cat([latents, extra]), steps + [0] * len(firsts),
                             [self._positive] * n + [self._negative] * len(firsts))
            positive = sched.epsilon(latents, out[:n], rows=index)
            references = {}
            for j, i in enumerate(firsts):  # the negative pass's x0 becomes the frame's reference
                eps_neg = sched.epsilon(extra[j:j + 1], out[n + j:n + j + 1], rows=slice(0, 1))
                references[i] = x0_estimate(extra[j:j + 1], eps_neg, sched.alpha[:1], sched.sigma[:1])
            refs = torch.cat([references.get(i, slot.reference) for i, slot in enumerate(slots)])
            negative = residual_noise(latents, refs, alpha, sigma)
        else:
            out = self._unet(latents, steps, [self._positive] * n)
            positive = sched.epsilon(latents, out, rows=index)
            negative = None
            if mode == "self":
                negative = residual_noise(latents, torch.cat([slot.reference for slot in slots]), alpha, sigma)
        eps = positive if negative is None else guided(positive, negative, self.settings.cfg, self.settings.delta)
        return sched.denoised(latents, eps, rows=index), references

    # -- the stream -------------------------------------------------------------------------------------

    def push(self, frame=None, frame_id: int | None = None) -> list:
        """Feed one frame ([1, 3, H, W] in 0..1; None for txt2img); the StreamOutputs that leave now."""
        if self._scopes is None:
            raise RuntimeError("use the StreamPipeline as a context manager (with stream: ...)")
        frame_id = self.stats.frames_in if frame_id is None else frame_id
        self.stats.frames_in += 1
        if frame is not None and self.filter is not None and self._last_image is not None \
                and self.filter.should_skip(frame):
            self.stats.skipped += 1
            return [self._emit(StreamOutput(frame_id, self._last_image, skipped=True))]
        if frame is not None and self.filter is not None and self._last_image is None:
            self.filter.should_skip(frame)  # the first frame becomes the filter's reference
        slot = self._entering(frame_id, frame)
        if self.settings.stream_batch:
            return self._advance(slot)
        return self._whole(slot)

    def flush(self) -> list:
        """Run the frames still in flight to the end (no new frame enters)."""
        outputs = []
        while any(slot is not None for slot in self._slots):
            outputs += self._advance(None)
        return outputs

    def _whole(self, slot: _Slot) -> list:
        """Every step of one frame, one after another."""
        sched = self.schedule
        for step in range(self.settings.steps):
            denoised, refs = self._step([slot], [step])
            if refs:
                slot.reference = refs[0]
            if step + 1 < self.settings.steps:
                slot.latents = sched.noised(denoised, self._stage_noise[step + 1:step + 2],
                                            rows=slice(step + 1, step + 2))
        return [self._finish(slot, denoised)]

    def _advance(self, entering: _Slot | None) -> list:
        """One stream-batch call: every slot one step on; the last slot leaves."""
        sched, n = self.schedule, self.settings.steps
        slots = [entering] + self._slots
        live = [slot for slot in slots if slot is not None]
        filler = live[0]
        batch = [slot if slot is not None else filler for slot in slots]  # one batch shape from the start
        denoised, refs = self._step(batch, list(range(n)))
        for i, ref in (refs or {}).items():
            if slots[i] is not None:
                slots[i].reference = ref
        outputs = []
        if slots[-1] is not None:
            outputs.append(self._finish(slots[-1], denoised[n - 1:n]))
        moved = [None] * (n - 1)
        for k in range(n - 1):
            if slots[k] is not None:
                slot = slots[k]
                slot.latents = sched.noised(denoised[k:k + 1], self._stage_noise[k + 1:k + 2], rows=slice(k + 1,
                                                                                                         k + 2))
                moved[k] = slot
        self._slots = moved
        return outputs

    def _finish(self, slot: _Slot, denoised) -> StreamOutput:
        image = self.decode(denoised)
        self._last_image = image
        return self._emit(StreamOutput(slot.frame, image, latency_s=time.perf_counter() - slot.arrived))

    def _emit(self, output: StreamOutput) -> StreamOutput:
        self.stats.frames_out += 1
        if not output.skipped:
            self.stats.latencies_s.append(output.latency_s)
        return output


def _rows(cond: dict, rows: slice, dtype) -> dict:
    """The rows `rows` of a conditioning dict (nested: SDXL's added_cond_kwargs), floats in the UNet's `dtype`
    (the text encoders may run in another precision)."""
    return {k: (_rows(v, rows, dtype) if isinstance(v, dict) else
                v[rows].to(dtype) if v.is_floating_point() else v[rows]) for k, v in cond.items()}


def _stack(conditionings: list, expected: int) -> dict:
    """One conditioning dict for a batch, row i from `conditionings[i]`."""
    import torch

    first = conditionings[0]
    assert len(conditionings) == expected
    return {k: (_stack([c[k] for c in conditionings], expected) if isinstance(first[k], dict)
                else torch.cat([c[k] for c in conditionings])) for k in first}


__all__ = ["StreamPipeline", "StreamOutput", "StreamStats", "check_stream_spec", "percentile"]
