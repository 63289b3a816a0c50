"""MODEL -> MODEL nodes: SDAccel's units on ComfyUI's own model, so Load Checkpoint -> LoRA -> KSampler graphs
(ControlNets, any sampler and scheduler) speed up without an SDACCEL_PIPE.

Each node clones the model and adds wrappers (ComfyUI's public `ModelPatcher.add_wrapper_with_key`); nothing is
changed until a sampling run starts, and every effect is removed in `finally` when it ends, so the same model
bypassing the node samples exactly as before. The numerical work is the engine's (`optim/native/`); what is
ComfyUI's is here: which weights its Conv2d classes use, where the step index comes from, and where the
statistics go (the log, and a message the page draws on the node).
"""

from __future__ import annotations

import importlib
import logging
import time

from ..optim.spec.errors import ConfigError
from ..optim.units.compile.config import CompileConfig
from ..optim.units.deepcache.config import DeepCacheConfig
from ..optim.units.winograd.config import WinogradConfig
from .inputs import split_inputs, ui_fields, values, widget

log = logging.getLogger(__name__)

CATEGORY = "sdaccel/model_patches"
MODEL_TOOLTIP = "A diffusion model from Load Checkpoint, a LoRA loader or another patch (SD 1.x, SD 2.x, SDXL)"
STATS_EVENT = "sdaccel.model_patch"  # websocket message the page turns into a badge on the patch node
_WRAPPER_KEY = "sdaccel"


def _comfy(name: str):
    """A ComfyUI module; these nodes only execute inside ComfyUI."""
    return importlib.import_module(name)


def _prompt_server():
    """ComfyUI's running PromptServer (None outside a server, e.g. in-process checks)."""
    return getattr(getattr(_comfy("server"), "PromptServer", None), "instance", None)


def _running_prompt_id(server) -> str | None:
    """The id of the prompt being executed: ComfyUI's execution context (set around each node's execution), else
    the id its queue loop last started; the page files the stats under the tab that queued that prompt."""
    try:
        context = _comfy("comfy_execution.utils").get_executing_context()
    except (ImportError, AttributeError):
        context = None
    if context is not None and getattr(context, "prompt_id", None):
        return str(context.prompt_id)
    prompt_id = getattr(server, "last_prompt_id", None)
    return None if prompt_id is None else str(prompt_id)


def comfy_conv_weights(conv, x):
    """The weight and bias ComfyUI's own Conv2d uses for this call (`comfy.ops.cast_bias_weight`: cast to the
    input's dtype and device), or None where ComfyUI makes them per call itself (a LoRA applied through weight
    functions in low-VRAM mode): that call then stays ComfyUI's."""
    if getattr(conv, "weight_function", None) or getattr(conv, "bias_function", None):
        return None
    weight, bias = conv.weight, conv.bias
    if getattr(conv, "comfy_cast_weights", False):
        weight = weight.to(device=x.device, dtype=x.dtype)
        bias = None if bias is None else bias.to(device=x.device, dtype=x.dtype)
    return weight, bias


def step_of(transformer_options: dict, sigma) -> tuple[int, int]:
    """(index of the schedule step whose sigma is nearest to `sigma`, number of steps) for this sampling run."""
    sigmas = transformer_options.get("sample_sigmas")
    if sigmas is None or len(sigmas) < 2:
        return 0, 1
    current = float(sigma.flatten()[0]) if hasattr(sigma, "flatten") else float(sigma)
    schedule = sigmas[:-1].float().cpu()
    return int((schedule - current).abs().argmin()), len(sigmas) - 1


class RunReport:
    """What one patch did during one sampling run, told to the log and to the page."""

    def __init__(self, title: str, node_id: str | None, steps: int):
        from ..optim.core.registry import RunContext

        self.title, self.node_id = title, node_id
        self.context = RunContext(pipe=None, family=None, device="cpu", steps=steps, batch=0, cfg_steps=steps)
        self.started = time.perf_counter()

    def finish(self, lines: list[str]) -> None:
        seconds = time.perf_counter() - self.started
        steps = max(1, self.context.steps)
        lines = lines + self.context.notes + [f"{seconds / steps:.2f} s per step over {steps} steps"]
        for line in lines:
            log.info("%s: %s", self.title, line)
        server = _prompt_server()
        if server is not None and self.node_id is not None:
            server.send_sync(STATS_EVENT, {"node": self.node_id, "prompt_id": _running_prompt_id(server),
                                           "title": self.title, "lines": lines,
                                           "counters": dict(self.context.counters)}, server.client_id)


def show_busy(node_id: str | None):
    """A RunContext busy listener: a patch's long first-use work (Winograd's calibration) shown on its node as
    text and a progress bar, and stopped at once by ComfyUI's interrupt (its progress hook checks the flag)."""
    model_management, utils = _comfy("comfy.model_management"), _comfy("comfy.utils")
    shown = {}

    def listener(what: str, done: int, total: int) -> None:
        model_management.throw_exception_if_processing_interrupted()
        if what not in shown:
            shown.clear()
            shown[what] = utils.ProgressBar(total, node_id=node_id)
            server = _prompt_server()
            if server is not None and node_id is not None:
                server.send_progress_text(what, node_id)
        shown[what].update_absolute(done, total)

    return listener


def _steps_of(sigmas) -> int:
    return max(1, len(sigmas) - 1)


class _ModelPatch:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "patch"
    TITLE = ""

    CHOICES: dict[str, tuple] = {}  # fields whose engine choices this node narrows (the first is the default)
    DEFAULTS: dict[str, object] = {}  # fields whose engine default this node changes

    @classmethod
    def fields(cls):
        return ()

    @classmethod
    def INPUT_TYPES(cls):
        required = {"model": ("MODEL", {"tooltip": MODEL_TOOLTIP})}
        for info in cls.fields():
            required[info.name] = widget(info, empty=True)
            if info.name in cls.CHOICES:
                choices = cls.CHOICES[info.name]
                required[info.name] = (list(choices), {**required[info.name][1], "default": choices[0]})
            if info.name in cls.DEFAULTS:
                required[info.name] = (required[info.name][0], {**required[info.name][1],
                                                                "default": cls.DEFAULTS[info.name]})
        return {**split_inputs(required, cls.fields()), "hidden": {"unique_id": "UNIQUE_ID"}}

    @staticmethod
    def _check_layout(model, option: str) -> None:
        from ..optim.native.ldm import find_ldm_unet

        find_ldm_unet(model.model, option)  # a DiT (SD3, Flux) gets its clear error on this node

    @staticmethod
    def _add(model, wrapper_type: str, wrapper) -> None:
        model.add_wrapper_with_key(wrapper_type, _WRAPPER_KEY, wrapper)


class SDAccelWinogradModel(_ModelPatch):
    """Winograd convolution on every eligible 3x3 convolution of the diffusion model, for each sampling run."""

    TITLE = "SDAccel Winograd (model)"
    DESCRIPTION = ("Winograd convolution on the diffusion model's 3x3 convolutions: fewer multiplications on a CPU, "
                   "the same image to fp32 rounding. The transformed filters follow the weights ComfyUI uses for "
                   "the run (LoRAs included) and are kept while those weights stay. The first use on a machine "
                   "builds SDAccel's native kernel in the background (about 2 minutes; those runs use F.conv2d "
                   "and say so, the next run picks the kernel up). The first use of each new "
                   "image size measures its convolution shapes on this CPU (about 40 s at 512x512 on 2 "
                   "cores, shown on this node, stopped by Cancel) and keeps the result. Pays most at small sizes "
                   "(1.76x at 256x256); at 512x512 ComfyUI's CPU attention dominates the step: put SDAccel "
                   "Attention (model) in front. CPU only; on a GPU the model samples unchanged.")
    # The compiled transforms take 7% off the UNet's convolution time at 512x512 but cost a one-time compile of
    # about 4 minutes on 2 cores (2 with inductor's disk cache warm): opt-in here, where a first run must not
    # stall a queue.
    DEFAULTS = {"fused_transforms": False}

    @classmethod
    def fields(cls):
        return ui_fields(WinogradConfig, skip=("unet", "vae"))

    def patch(self, model, unique_id=None, **given):
        from ..optim.native.winograd import NativeWinograd, winograd_summary

        self._check_layout(model, "SDAccel Winograd")
        cfg = WinogradConfig(**values(self.fields(), given))
        state = NativeWinograd(cfg, weights=comfy_conv_weights)
        patched = model.clone()

        def sampler_sample(executor, guider, sigmas, *args, **kwargs):
            report = RunReport(self.TITLE, unique_id, _steps_of(sigmas))
            device = getattr(guider.model_patcher, "load_device", None)
            if getattr(device, "type", "cpu") != "cpu":
                report.context.note(f"stepped aside: the model runs on {device}, and Winograd is for CPUs")
                try:
                    return executor(guider, sigmas, *args, **kwargs)
                finally:
                    report.finish([])
            report.context.busy_listeners.append(show_busy(unique_id))
            with state.run(guider.inner_model, report.context):
                result = executor(guider, sigmas, *args, **kwargs)
            report.finish(winograd_summary(report.context.counters))
            return result

        self._add(patched, _comfy("comfy.patcher_extension").WrappersMP.SAMPLER_SAMPLE, sampler_sample)
        return (patched,)


class SDAccelDeepCacheModel(_ModelPatch):
    """DeepCache on ComfyUI's own UNet: the deep features of a full step reused for the next ones."""

    TITLE = "SDAccel DeepCache (model)"
    DESCRIPTION = ("DeepCache on the diffusion model: every cache_interval steps the whole UNet runs; in between "
                   "only its outer layers do, resuming from the kept deep features. Changes the image (measured). "
                   "With a ControlNet applied it steps aside (full UNet every step, noted in the stats): the "
                   "ControlNet's deep residuals change every step. Combines with SDAccel CFG Cutoff (model).")

    @classmethod
    def fields(cls):
        return ui_fields(DeepCacheConfig)

    def patch(self, model, unique_id=None, **given):
        from ..optim.native.deepcache import LDMDeepCache

        self._check_layout(model, "SDAccel DeepCache")
        cfg = DeepCacheConfig(**values(self.fields(), given))
        LDMDeepCache(model.model, cfg)  # a branch this UNet lacks fails here, on this node
        patched = model.clone()
        live = {}
        wrappers = _comfy("comfy.patcher_extension").WrappersMP

        def sampler_sample(executor, guider, sigmas, *args, **kwargs):
            report = RunReport(self.TITLE, unique_id, _steps_of(sigmas))
            cache = LDMDeepCache(guider.inner_model, cfg)
            cache.install()
            live["run"] = (cache, report)
            try:
                result = executor(guider, sigmas, *args, **kwargs)
            finally:
                live.clear()
                cache.uninstall()
            c = report.context.counters
            calls = sum(c.get(f"deepcache_{kind}_calls", 0) for kind in ("full", "cached", "bypassed"))
            report.finish([f"{c.get('deepcache_cached_calls', 0)} of {calls} UNet calls reused cached features "
                           f"(interval {cfg.cache_interval}, branch {cfg.cache_branch_id})"])
            return result

        def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                        **kwargs):
            if "run" not in live:  # a call outside a sampling run (a preview, another node): leave it alone
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            cache, report = live["run"]
            step, _ = step_of(transformer_options or {}, t)
            bypass = "a ControlNet is applied" if control is not None else ""
            with cache.call(step, x, report.context, bypass=bypass):
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        self._add(patched, wrappers.SAMPLER_SAMPLE, sampler_sample)
        self._add(patched, wrappers.APPLY_MODEL, apply_model)
        return (patched,)


class SDAccelCFGCutoffModel(_ModelPatch):
    """Classifier-free guidance stopped part-way: later steps run the conditional pass only."""

    TITLE = "SDAccel CFG Cutoff (model)"
    DESCRIPTION = ("Stop classifier-free guidance after a fraction (or a step) of the run: the later steps skip "
                   "the unconditional pass, so they cost about half. Works with every KSampler sampler and "
                   "scheduler. Changes the image (measured).")

    @classmethod
    def fields(cls):
        from ..optim.spec.pipeline import GenerationRequest

        return tuple(info for info in ui_fields(GenerationRequest) if info.name in ("cfg_cutoff", "cfg_cutoff_step"))

    def patch(self, model, unique_id=None, **given):
        from ..optim.run.guidance import guided_steps

        settings = values(self.fields(), given, empty=True)
        cutoff = float(settings.get("cfg_cutoff", 1.0))
        cutoff_step = settings.get("cfg_cutoff_step")
        if not 0.0 <= cutoff <= 1.0:
            raise ConfigError("cfg_cutoff", f"{cutoff} is outside 0..1", "use a fraction of the steps (1 = never cut)")
        patched = model.clone()
        live = {}
        wrappers = _comfy("comfy.patcher_extension").WrappersMP

        def sampler_sample(executor, guider, sigmas, *args, **kwargs):
            steps = _steps_of(sigmas)
            report = RunReport(self.TITLE, unique_id, steps)
            guided = guided_steps(steps, float("inf"), cutoff, cutoff_step)  # inf: any scale above 1 guides
            live["run"] = (report, guided)
            try:
                result = executor(guider, sigmas, *args, **kwargs)
            finally:
                live.clear()
            c = report.context.counters
            report.finish([f"{c.get('cfg_guided_calls', 0)} model calls with guidance, "
                           f"{c.get('cfg_unguided_calls', 0)} without (guidance on the first "
                           f"{guided} of {steps} steps)"])
            return result

        def calc_cond_batch(executor, model_, conds, x_in, timestep, model_options):
            if "run" not in live or len(conds) < 2 or conds[1] is None:
                return executor(model_, conds, x_in, timestep, model_options)
            report, guided = live["run"]
            step, _ = step_of(model_options.get("transformer_options", {}), timestep)
            if step < guided:
                report.context.count("cfg_guided_calls")
                return executor(model_, conds, x_in, timestep, model_options)
            report.context.count("cfg_unguided_calls")
            out = executor(model_, [conds[0], None] + list(conds[2:]), x_in, timestep, model_options)
            return [out[0], out[0]] + list(out[2:])  # uncond = cond: the guidance formula returns cond

        self._add(patched, wrappers.SAMPLER_SAMPLE, sampler_sample)
        self._add(patched, wrappers.CALC_COND_BATCH, calc_cond_batch)
        return (patched,)


class SDAccelCompileModel(_ModelPatch):
    """The diffusion model compiled for the CPU (OpenVINO, or inductor with frozen weights) for each run."""

    TITLE = "SDAccel Compile (model)"
    DESCRIPTION = ("Compile the diffusion model for the CPU: openvino (pip install openvino; about 1.5x per step, a "
                   "minute or two to convert the first time) or inductor with the weights frozen in (needs a C++ "
                   "compiler; longer first compile). The same image within fp32 rounding. Calls a graph cannot "
                   "hold (a ControlNet, another node's UNet patches, DeepCache's steps) run uncompiled, said in "
                   "the stats; another LoRA strength recompiles; a failed compile runs uncompiled with a note.")
    CHOICES = {"backend": ("openvino", "inductor")}

    @classmethod
    def fields(cls):
        return ui_fields(CompileConfig, skip=("targets", "granularity", "mode", "freezing"))

    def patch(self, model, unique_id=None, **given):
        from ..optim.native.compile import NativeCompile

        self._check_layout(model, "SDAccel Compile")
        settings = values(self.fields(), given)
        cfg = CompileConfig(freezing=settings.get("backend") == "inductor", **settings)  # unfrozen: no CPU gain
        interrupt = _comfy("comfy.model_management").InterruptProcessingException
        state = NativeCompile(cfg, passthrough=(interrupt,))
        patched = model.clone()
        live = {}
        wrappers = _comfy("comfy.patcher_extension").WrappersMP

        def sampler_sample(executor, guider, sigmas, *args, **kwargs):
            report = RunReport(self.TITLE, unique_id, _steps_of(sigmas))
            with state.run(guider.inner_model, report.context):
                live["run"] = report
                try:
                    result = executor(guider, sigmas, *args, **kwargs)
                finally:
                    live.clear()
            c = report.context.counters
            backend = state.cfg.backend if state.cfg is not None else "none"
            report.finish([f"{backend}: {c.get('compile_compiled_calls', 0)} compiled and "
                           f"{c.get('compile_eager_calls', 0)} uncompiled model calls; "
                           f"{c.get('compile_graphs', 0)} graph(s) built in {c.get('compile_s', 0.0):.1f} s"])
            return result

        def diffusion_model(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
            def eager():
                return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

            report = live.get("run")
            if report is None:  # a call outside a sampling run: the host's own
                return eager()
            return state.call(eager, report.context, x, timesteps, context, y, control, transformer_options,
                              **kwargs)

        self._add(patched, wrappers.SAMPLER_SAMPLE, sampler_sample)
        self._add(patched, wrappers.DIFFUSION_MODEL, diffusion_model)
        return (patched,)


class SDAccelPrecisionModel(_ModelPatch):
    """The diffusion model in native half precision and/or channels-last for each sampling run."""

    TITLE = "SDAccel Precision (model)"
    DESCRIPTION = ("Run the diffusion model in half precision (bf16 on CPUs with AVX512-BF16 or AMX) and/or with "
                   "channels-last weights. Unlike ComfyUI's ModelComputeDtype, which casts every fp32 weight to "
                   "bf16 inside every layer call, the weights are converted once when a run starts (LoRAs "
                   "included) and put back when it ends: the same numbers as ModelComputeDtype bf16, without the "
                   "per-step copies. During a run the fp32 weights are kept for afterwards (1.5x the model's "
                   "memory). On a CPU without native bf16, half keeps fp32 and says so.")

    @classmethod
    def fields(cls):
        from ..optim.native.precision import ModelPrecisionConfig

        return ui_fields(ModelPrecisionConfig)

    def patch(self, model, unique_id=None, **given):
        import torch

        from ..optim.native.ldm import find_ldm_unet
        from ..optim.native.precision import ModelPrecisionConfig, converted, resolve_dtype

        self._check_layout(model, "SDAccel Precision")
        cfg = ModelPrecisionConfig(**values(self.fields(), given))
        dtype, note = resolve_dtype(cfg.dtype, model.load_device)
        patched = model.clone()
        if dtype != torch.float32:
            patched.add_object_patch("manual_cast_dtype", dtype)  # the dtype ComfyUI casts the inputs to

        def sampler_sample(executor, guider, sigmas, *args, **kwargs):
            report = RunReport(self.TITLE, unique_id, _steps_of(sigmas))
            if note:
                report.context.note(note)
            unet = find_ldm_unet(guider.inner_model, "SDAccel Precision")
            with converted(unet, report.context, dtype=dtype, channels_last=cfg.channels_last):
                result = executor(guider, sigmas, *args, **kwargs)
            c = report.context.counters
            name = str(dtype).replace("torch.", "")
            lines = [f"weights {name}: {c['precision_weight_bytes_before'] / 2**20:.0f} -> "
                     f"{c['precision_weight_bytes'] / 2**20:.0f} MB for the run (plus "
                     f"{c['precision_held_bytes'] / 2**20:.0f} MB of originals kept), converted in "
                     f"{c['precision_convert_s']:.2f} s"]
            if cfg.channels_last:
                lines.append(f"channels-last: {c['precision_channels_last_weights']} 4-D weights")
            report.finish(lines)
            return result

        self._add(patched, _comfy("comfy.patcher_extension").WrappersMP.SAMPLER_SAMPLE, sampler_sample)
        return (patched,)


class SDAccelAttentionModel(_ModelPatch):
    """ComfyUI's own attention function of the caller's choice for the diffusion model, for this model only."""

    TITLE = "SDAccel Attention (model)"
    DESCRIPTION = ("Choose which of ComfyUI's own attention functions the diffusion model uses, for this model "
                   "only (no restart, no command-line flag). On a CPU ComfyUI uses sub-quadratic attention, "
                   "which computes in chunks to save memory; pytorch (scaled_dot_product_attention) is the same "
                   "attention to fp32 rounding and faster there (measured). auto: pytorch on a CPU, ComfyUI's "
                   "choice elsewhere.")
    BACKENDS = ("auto", "pytorch", "sub_quad", "split")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": MODEL_TOOLTIP}),
                             "backend": (list(cls.BACKENDS), {"default": "auto", "tooltip": cls.DESCRIPTION})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    def patch(self, model, backend="auto", unique_id=None):
        if backend not in self.BACKENDS:
            raise ConfigError("backend", f"{backend!r} is not one of {', '.join(self.BACKENDS)}",
                              "pick one of the listed attention functions")
        self._check_layout(model, "SDAccel Attention")
        attention = _comfy("comfy.ldm.modules.attention")
        device = getattr(model, "load_device", None)
        name = backend
        if backend == "auto":
            name = "pytorch" if getattr(device, "type", "cpu") == "cpu" else ""
        patched = model.clone()
        if not name:  # ComfyUI's own choice for this device
            return (patched,)
        chosen = attention.get_attention_function(name)
        calls = {"n": 0}

        def override(func, *args, **kwargs):
            calls["n"] += 1
            return chosen(*args, **kwargs)

        options = patched.model_options.setdefault("transformer_options", {})
        options["optimized_attention_override"] = override

        def sampler_sample(executor, guider, sigmas, *args, **kwargs):
            report = RunReport(self.TITLE, unique_id, _steps_of(sigmas))
            before = calls["n"]
            result = executor(guider, sigmas, *args, **kwargs)
            report.finish([f"{calls['n'] - before} attention calls through ComfyUI's {name} attention"])
            return result

        self._add(patched, _comfy("comfy.patcher_extension").WrappersMP.SAMPLER_SAMPLE, sampler_sample)
        return (patched,)


MODEL_PATCHES = {cls.__name__: cls for cls in (SDAccelWinogradModel, SDAccelDeepCacheModel, SDAccelCFGCutoffModel,
                                               SDAccelCompileModel, SDAccelPrecisionModel, SDAccelAttentionModel)}
MODEL_PATCH_NAMES = {name: cls.TITLE for name, cls in MODEL_PATCHES.items()}
__all__ = ["MODEL_PATCHES", "MODEL_PATCH_NAMES", "comfy_conv_weights", "step_of"]
