"""Compile on a host's LDM UNet: its plain-tensor call (sample, timesteps, context, class vector) compiled once by
OpenVINO or inductor, used for every call it can serve; any other call runs the host's own forward.

The compiled graph is the host's forward with nothing hooked in, so a call carrying what a trace cannot hold
(ControlNet residuals, another node's UNet patches, extra model inputs, weights a host computes per call) runs
eager and says why. The weights a graph baked in are checked before each run: a LoRA at another strength
recompiles (or stops, if asked to). A compile that fails leaves the model eager for the rest of the patch's life
with a note, never a crashed run. The machinery (engines, weight watch, counters) is the compile unit's.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from typing import Callable

import torch

from ..core.registry import RunContext
from ..spec.errors import ConfigError, UnavailableError
from ..units.compile.config import CompileConfig
from ..units.compile.engines import CompileTarget, PlainCall
from ..units.compile.unit import check_backend, make_engine, report_compiles
from .ldm import find_ldm_unet, layer_patches

log = logging.getLogger(__name__)

OPTION = "SDAccel Compile"
NATIVE_BACKENDS = ("openvino", "inductor")  # CPU compilers; on a GPU ComfyUI's own TorchCompileModel serves
_SETTLED_OPTIONS = ("patches", "patches_replace")  # transformer_options entries that change what the UNet computes


class _LDMCallIO:
    """The LDM UNet called with plain tensors: (x, timesteps, context) plus the class vector `y` for SDXL."""

    label = "diffusion_model"
    OV_INPUTS = (("x", (0, 2, 3)), ("timesteps", (0,)), ("context", (0, 1)), ("y", (0,)))

    def __init__(self, eager: Callable):
        pass

    @staticmethod
    def prepare(args, kwargs):
        return PlainCall(args, kwargs), False

    @staticmethod
    def finish(out, return_dict: bool):
        return out

    @staticmethod
    def ov_tensors(bound) -> list:
        return list(bound.args)

    @staticmethod
    def trace_key(module: torch.nn.Module, tensors: list) -> tuple:
        """Whether the latent divides by the UNet's downsampling factor: otherwise the host's forward interpolates
        to the skip's size, a different graph."""
        factor = 2 ** sum(type(m).__name__ == "Downsample" for m in module.input_blocks.modules())
        return tuple(size % factor == 0 for size in tensors[0].shape[-2:])

    @staticmethod
    def ov_adapter(eager: Callable, module: torch.nn.Module, count: int) -> torch.nn.Module:
        return _LDMAdapter(eager, module)

    @staticmethod
    def ov_output(results: list):
        return results[0]


class _LDMAdapter(torch.nn.Module):
    def __init__(self, eager: Callable, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet  # registered so tracing records its weights as module state
        self._eager = eager

    def forward(self, x, timesteps, context, y=None):
        return self._eager(x, timesteps, context, y)


def plain_forward(unet: torch.nn.Module) -> Callable:
    """The host's own forward body with no control, no patches and no wrappers (`_forward` in ComfyUI, whose
    `forward` runs the wrappers first; the plain `forward` elsewhere)."""
    body = getattr(unet, "_forward", None) or unet.forward

    def call(x, timesteps, context, y=None):
        return body(x, timesteps, context, y, None, {})

    return call


def per_call_weights(unet: torch.nn.Module) -> bool:
    """Whether the host computes some weight per call (ComfyUI's low-VRAM LoRA weight functions), which a graph
    would freeze at its first value."""
    return any(getattr(m, "weight_function", None) or getattr(m, "bias_function", None) for m in unet.modules())


class NativeCompile:
    """One patch's compiled graphs for the UNet it last ran on, and why calls ran eager."""

    def __init__(self, cfg: CompileConfig, *, passthrough: tuple[type[BaseException], ...] = ()):
        if cfg.backend not in NATIVE_BACKENDS:
            raise ConfigError("backend", f"{cfg.backend} is not offered on a host's model",
                              f"use {' or '.join(NATIVE_BACKENDS)} on a CPU (on a GPU, the host's own compile node)")
        if cfg.granularity == "blocks" or cfg.targets != "unet":
            raise ConfigError("granularity", "a host's model compiles whole (the UNet)", "use granularity auto")
        self.requested = cfg
        self.cfg: CompileConfig | None = None  # what runs, once chosen: the requested backend or its stand-in
        self.passthrough = passthrough  # the host's own exceptions (an interrupt) that must not be taken for a failure
        self.target: CompileTarget | None = None
        self.failed = ""
        self._unet = None
        self._eager_reason = ""

    # -- choosing the backend
    def _choose(self, device: torch.device, run: RunContext) -> CompileConfig | None:
        """The requested backend, else the other CPU compiler (noted), else None (eager, noted)."""
        cfg = self.requested
        float_openvino = [dataclasses.replace(cfg, openvino_int8="off")] if cfg.openvino_int8 != "off" else []
        candidates = [cfg] + float_openvino + [CompileConfig(backend=b, freezing=b == "inductor" and device.type == "cpu",
                                            dynamic=cfg.dynamic, on_weight_change=cfg.on_weight_change)
                              for b in NATIVE_BACKENDS if b != cfg.backend]
        reasons = []
        for candidate in candidates:
            try:
                check_backend(candidate, device)
            except UnavailableError as exc:
                reasons.append(str(exc))
                continue
            if candidate is not cfg:
                instead = "without int8" if candidate in float_openvino else f"with {candidate.backend} instead"
                run.note(f"compile: {reasons[0]}; compiled {instead}")
            return candidate
        run.note(f"compile: no compiler available, the model runs eager ({'; '.join(reasons)})")
        return None

    def _target_for(self, unet: torch.nn.Module, run: RunContext) -> CompileTarget | None:
        if self._unet is not unet:
            self.release()
            self._unet = unet
            device = next(unet.parameters()).device
            self.cfg = self._choose(device, run)
            if self.cfg is not None:
                self.target = CompileTarget(unet, _LDMCallIO, self.cfg, make_engine(self.cfg, "ldm_unet"),
                                            eager=plain_forward(unet))
        return self.target

    # -- a run
    @contextmanager
    def run(self, model, run: RunContext):
        """Compiled calls for `model`'s UNet during the block, with what was compiled (and why not) reported."""
        unet = find_ldm_unet(model, OPTION)
        target = None if self.failed else self._target_for(unet, run)
        if self.failed:
            run.note(f"compile: off since it failed ({self.failed}); the model runs eager. Re-create the node to "
                     "try again")
        self._eager_reason = "the host computes LoRA weights per call (low-VRAM mode)" if per_call_weights(unet) \
            else ""
        if target is None:
            yield self
            return
        before = target.counts.copy()
        target.ensure_fresh()  # baked weights that changed (another LoRA strength) rebuild here, or stop
        target.in_run = True
        ended = False
        try:
            yield self
            ended = True
        finally:
            target.in_run = False
            if ended and not self.failed:
                target.end_run()  # int8 full: the model calibrated on this run's recorded calls is built now
            report_compiles(self.cfg, [target], [before], run)

    def eager_reason(self, y, control, options: dict, extra: dict) -> str:
        """Why this call cannot take the compiled graph ("" when it can)."""
        if self._eager_reason:
            return self._eager_reason
        if control is not None:
            return "a ControlNet is applied"
        if any(options.get(name) for name in _SETTLED_OPTIONS):
            return "another node patches the UNet's layers or attention"
        if any(value is not None for value in extra.values()):
            return f"the call carries extra model inputs ({', '.join(sorted(extra))})"
        if layer_patches(self._unet):
            return f"{', '.join(sorted(layer_patches(self._unet)))} replaces UNet layers during this run"
        return ""

    def call(self, eager: Callable, run: RunContext, x, timesteps, context, y, control, options, **extra):
        """One UNet call: compiled where it can be, else `eager()` (the host's own call) with the reason noted."""
        target = self.target
        reason = "" if target is not None and not self.failed else "off"
        reason = reason or self.eager_reason(y, control, options, extra)
        if reason:
            run.count("compile_eager_calls")
            if reason != "off":
                run.note(f"compile: calls ran eager because {reason}")
            return eager()
        tensors = (x, timesteps, context) if y is None else (x, timesteps, context, y)
        try:
            recorded = target.counts.calibration_calls
            out = target(tensors, {})
            if target.counts.calibration_calls == recorded:  # else it ran eager to record int8 calibration inputs
                run.count("compile_compiled_calls")
            return out
        except self.passthrough:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: eager from now on, said in the stats
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            log.warning("SDAccel compile: %s failed, running eager: %s", self.cfg.backend, self.failed, exc_info=exc)
            run.count("compile_failures")
            run.count("compile_eager_calls")
            run.note(f"compile: {self.cfg.backend} failed ({self.failed}); this and later runs are eager")
            target.release()
            return eager()

    def release(self) -> None:
        if self.target is not None:
            self.target.release()
        self.target, self._unet, self.cfg = None, None, None
