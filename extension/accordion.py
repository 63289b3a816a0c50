"""The "SDAccel" accordion in A1111/Forge txt2img and img2img: host-native units on the host's own UNet for one
generation, removed after it (the same engine code as ComfyUI's MODEL patches, `optim/native/`).

- Winograd: hooks on the UNet's 3x3 convolutions (CPU only; the same image to fp32 rounding). The transformed
  filters are kept between generations while the weights stay (a LoRA change remakes them).
- Channels-last: the UNet's 4-D weights relaid NHWC during the run, put back after it (lossless).
- DeepCache: every `interval` denoiser steps the whole UNet runs; in between only its outer layers do, resuming
  from the kept deep features (`optim/native/deepcache.py`, lossy). With a ControlNet's residuals in the call
  (Forge passes them to the UNet) or another extension's hook on the UNet's forward (A1111's ControlNet) it steps
  aside: the full UNet every step, said in the console.
- CFG cutoff: after the given fraction of the denoiser calls, the unconditional pass is skipped, reusing A1111's
  own skip (the one NGMS uses: `s_min_uncond` with "all steps"). SDAccel's differs from A1111's two options in
  when it skips: "Skip Early CFG" skips the *first* steps, NGMS every *other* step below a sigma; the cutoff skips
  *every* step after a point, which keeps the composition (set early) and halves the UNet batch late.
Choices go into the image's `parameters` as `SDAccel: winograd, channels_last, deepcache=3, cfg_cutoff=0.5`, and
are read back by "send to txt2img". Forge runs the same denoiser (A1111's CFG denoiser, its NGMS skip) around a
ComfyUI-derived UNet in the same layout, so the accordion serves both hosts unchanged.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from . import settings

INFOTEXT_KEY = "SDAccel"


@dataclass(frozen=True)
class Choice:
    """The accordion's values, in the order of its controls (what `alwayson_scripts` args hold, too)."""

    enabled: bool = False
    winograd: bool = False
    channels_last: bool = False
    cfg_cutoff: float = 1.0
    deepcache: int = 1  # DeepCache's cache interval; 1: off (every step runs the whole UNet)

    # appended only: API clients send the args positionally, so older lists keep their meaning
    ORDER = ("enabled", "winograd", "channels_last", "cfg_cutoff", "deepcache")

    @classmethod
    def from_args(cls, args) -> "Choice":
        values = dict(zip(cls.ORDER, args))
        cutoff, interval = values.get("cfg_cutoff"), values.get("deepcache")
        return cls(enabled=bool(values.get("enabled")), winograd=bool(values.get("winograd")),
                   channels_last=bool(values.get("channels_last")),
                   cfg_cutoff=float(cutoff) if cutoff is not None else 1.0,
                   deepcache=int(interval) if interval is not None else 1)

    @property
    def active(self) -> bool:
        return self.enabled and (self.winograd or self.channels_last or self.cfg_cutoff < 1.0 or self.deepcache > 1)

    def label(self) -> str:
        parts = [name for name in ("winograd", "channels_last") if getattr(self, name)]
        if self.deepcache > 1:
            parts.append(f"deepcache={self.deepcache}")
        if self.cfg_cutoff < 1.0:
            parts.append(f"cfg_cutoff={self.cfg_cutoff:g}")
        return ", ".join(parts)

    @classmethod
    def from_infotext(cls, text: str) -> "Choice":
        parts = [p.strip() for p in str(text or "").split(",") if p.strip()]

        def number(key, default, kind):
            return next((kind(p.split("=", 1)[1]) for p in parts if p.startswith(key + "=")), default)

        return cls(enabled=bool(parts), winograd="winograd" in parts, channels_last="channels_last" in parts,
                   cfg_cutoff=number("cfg_cutoff", 1.0, float), deepcache=number("deepcache", 1, int))


def build_ui(gr, script, is_img2img: bool) -> list:
    """The accordion's controls, labelled from the engine's field descriptions; registers the infotext fields."""
    from ..optim.spec.fields import describe
    from ..optim.spec.pipeline import GenerationRequest
    from ..optim.units.channels_last.config import ChannelsLastConfig
    from ..optim.units.deepcache.config import DeepCacheConfig
    from ..optim.units.winograd.config import WinogradConfig

    cutoff = next(info for info in describe(GenerationRequest) if info.name == "cfg_cutoff")
    interval = next(info for info in describe(DeepCacheConfig) if info.name == "cache_interval")
    tab = "img2img" if is_img2img else "txt2img"
    with gr.Accordion("SDAccel", open=False, elem_id=f"sdaccel_accordion_{tab}"):
        enabled = gr.Checkbox(value=False, label="Enable SDAccel", elem_id=f"sdaccel_enabled_{tab}")
        with gr.Row():
            winograd = gr.Checkbox(value=False, label=f"{WinogradConfig.title} (CPU; lossless)",
                                   elem_id=f"sdaccel_winograd_{tab}")
            channels_last = gr.Checkbox(value=False, label=f"{ChannelsLastConfig.title} (lossless)",
                                        elem_id=f"sdaccel_channels_last_{tab}")
        cfg_cutoff = gr.Slider(minimum=cutoff.min, maximum=cutoff.max, step=cutoff.step, value=cutoff.default,
                               label="CFG cutoff (lossy; 1 = off)", elem_id=f"sdaccel_cfg_cutoff_{tab}")
        gr.Markdown(cutoff.tooltip)
        deepcache = gr.Slider(minimum=interval.min, maximum=interval.max, step=interval.step, value=1,
                              label=f"{DeepCacheConfig.title} interval (lossy; 1 = off)",
                              elem_id=f"sdaccel_deepcache_{tab}")
        gr.Markdown(interval.tooltip)
    controls = [enabled, winograd, channels_last, cfg_cutoff, deepcache]
    script.infotext_fields = [
        (enabled, lambda d: bool(d.get(INFOTEXT_KEY))),
        (winograd, lambda d: Choice.from_infotext(d.get(INFOTEXT_KEY)).winograd),
        (channels_last, lambda d: Choice.from_infotext(d.get(INFOTEXT_KEY)).channels_last),
        (cfg_cutoff, lambda d: Choice.from_infotext(d.get(INFOTEXT_KEY)).cfg_cutoff),
        (deepcache, lambda d: Choice.from_infotext(d.get(INFOTEXT_KEY)).deepcache),
    ]
    script.paste_field_names = []
    return controls


def host_unet(p):
    """The LDM UNet of the model `p` generates with: A1111 keeps it at sd_model.model.diffusion_model, Forge (whose
    UNet is ComfyUI's) at sd_model.forge_objects.unet.model.diffusion_model."""
    from ..optim.native.ldm import find_ldm_unet

    model = p.sd_model
    forge = getattr(getattr(model, "forge_objects", None), "unet", None)
    holder = forge.model if forge is not None else getattr(model, "model", model)
    return find_ldm_unet(holder, "SDAccel")


@contextmanager
def cfg_cutoff(p, fraction: float, notes: list):
    """Skip the unconditional pass after `fraction` of the denoiser calls, through A1111's own skip (NGMS)."""
    from modules import shared  # the host's options

    from ..optim.run.guidance import guided_steps

    denoiser = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
    if denoiser is None or not hasattr(denoiser, "forward"):
        notes.append("CFG cutoff stepped aside: this sampler has no CFG denoiser to cut")
        yield
        return
    user_ngms = bool(getattr(p, "s_min_uncond", 0))
    if user_ngms:
        notes.append("CFG cutoff stepped aside: NGMS (s_min_uncond) is set for this generation")
        yield
        return
    original = denoiser.__dict__.get("forward")
    bound = denoiser.forward
    skipped = [0]

    def forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        total = denoiser.total_steps or p.steps
        if denoiser.step >= guided_steps(total, float(cond_scale), fraction):
            skipped[0] += 1
            s_min_uncond = math.inf  # every sigma is below it: A1111 runs the conditional pass only
        return bound(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)

    was_all = shared.opts.s_min_uncond_all
    denoiser.forward = forward
    shared.opts.s_min_uncond_all = True  # the skip on every step past the cutoff, not every other one
    try:
        yield
    finally:
        shared.opts.s_min_uncond_all = was_all
        if original is None:
            del denoiser.forward
        else:
            denoiser.forward = original
        for key in ("NGMS", "NGMS all steps"):  # A1111 records its skip as NGMS: ours is SDAccel's cutoff
            p.extra_generation_params.pop(key, None)
        notes.append(f"CFG cutoff: {skipped[0]} denoiser calls without the unconditional pass")


@contextmanager
def deepcache(p, unet, interval: int, run):
    """DeepCache on the host's UNet for one generation: the step is the host's CFG denoiser's (A1111 and Forge
    count it there), so the cond and uncond halves of a step, batched or not, share one step's choice."""
    from ..optim.native.deepcache import LDMDeepCache
    from ..optim.units.deepcache.config import DeepCacheConfig

    if "forward" in unet.__dict__:  # another extension (A1111's ControlNet) runs the UNet through its own forward
        run.note("DeepCache stepped aside: another extension replaced the UNet's forward (a ControlNet?); the whole "
                 "UNet ran every step")
        yield
        return
    cache = LDMDeepCache(unet, DeepCacheConfig(cache_interval=interval, cache_branch_id=0))
    denoiser = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
    host_forward = unet.forward

    def forward(x, *args, **kwargs):
        step = int(getattr(denoiser, "step", 0) or 0)
        bypass = "a ControlNet is applied" if kwargs.get("control") is not None else ""
        with cache.call(step, x, run, bypass=bypass):
            return host_forward(x, *args, **kwargs)

    cache.install()
    unet.forward = forward
    try:
        yield
    finally:
        if unet.__dict__.get("forward") is forward:
            del unet.forward
        cache.uninstall()
        c = run.counters
        calls = sum(c.get(f"deepcache_{kind}_calls", 0) for kind in ("full", "cached", "bypassed"))
        run.note(f"DeepCache: {c.get('deepcache_cached_calls', 0)} of {calls} UNet calls reused cached features "
                 f"(interval {interval})")


def _show_busy(what: str, done: int, total: int) -> None:
    """Long one-time work inside a step (Winograd's first-use calibration): shown in the host's progress text,
    stopped by its Interrupt button between two measurements."""
    from modules import sd_samplers_common, shared

    shared.state.textinfo = f"SDAccel: {what} ({done}/{total})"
    if shared.state.interrupted or shared.state.skipped:
        raise sd_samplers_common.InterruptedException


class AccordionRun:
    """Installs a Choice on the host's UNet before sampling and removes it after; keeps Winograd's filters."""

    def __init__(self):
        self._stack: ExitStack | None = None
        self._winograd = None
        self._context = None
        self.last_lines: list[str] = []

    def install(self, p, choice: Choice) -> None:
        from ..optim.core.registry import RunContext

        self.remove(p)  # a generation that failed before its postprocess left ours in place
        if not choice.active:
            return
        unet = host_unet(p)
        device = next(unet.parameters()).device
        run = RunContext(pipe=None, family=None, device=device, steps=p.steps, batch=p.batch_size,
                         cfg_steps=p.steps)
        run.busy_listeners.append(_show_busy)
        stack = ExitStack()
        try:
            if choice.channels_last:
                from ..optim.native.precision import converted

                stack.enter_context(converted(unet, run, dtype=None, channels_last=True))
            if choice.winograd:
                if device.type != "cpu":
                    run.notes.append(f"Winograd stepped aside: the UNet runs on {device} (it is for CPUs)")
                else:
                    stack.enter_context(self._winograd_state().run(unet, run))
            if choice.deepcache > 1:
                stack.enter_context(deepcache(p, unet, choice.deepcache, run))
            if choice.cfg_cutoff < 1.0:
                stack.enter_context(cfg_cutoff(p, choice.cfg_cutoff, run.notes))
        except BaseException:
            stack.close()
            raise
        self._stack, self._context = stack, run
        p.extra_generation_params[INFOTEXT_KEY] = choice.label()

    def _winograd_state(self):
        from ..optim.native.winograd import NativeWinograd
        from ..optim.units.winograd.config import WinogradConfig
        from .weights import a1111_conv_weights

        budget = int(settings.value("sdaccel_winograd_filter_mb"))
        if self._winograd is not None and self._winograd.cfg.filter_cache_mb != budget:  # changed in Settings
            self._winograd.release()
            self._winograd = None
        if self._winograd is None:
            self._winograd = NativeWinograd(WinogradConfig(fused_transforms=False, filter_cache_mb=budget),
                                            weights=a1111_conv_weights)
        return self._winograd

    def remove(self, p=None) -> None:
        stack, run = self._stack, self._context
        self._stack = self._context = None
        if stack is None:
            return
        stack.close()
        from ..optim.native.winograd import winograd_summary

        counters = run.counters
        lines = winograd_summary(counters)
        if counters.get("precision_channels_last_weights"):
            lines.append(f"{counters['precision_channels_last_weights']} weights channels-last")
        lines.extend(run.notes)
        self.last_lines = lines
        if not settings.value("sdaccel_console_stats"):
            return
        for line in lines:  # the host's console, where A1111 users read what extensions did (its log shows warnings)
            print(f"SDAccel: {line}", flush=True)

    def release(self) -> None:
        """Free Winograd's filters (the script is unloaded, or the model changed)."""
        self.remove()
        if self._winograd is not None:
            self._winograd.release()
            self._winograd = None
