"""Compile backends: torch.compile (inductor), OpenVINO, and the CUDA-only stable-fast / OneDiff / TensorRT.

Lossless within floating-point tolerance. Compilation is lazy: the first UNet (or VAE decoder) call
after applying builds the compiled graph for that call's shapes, so the first run pays a compile pause
(minutes for a full UNet on a CPU), reported apart in RunStats counters as `compile_s`.

Three hazards are handled here rather than left to the user:
- Dynamo keeps compiled graphs on the code object it compiles. Compiling a UNet's own `forward` would
  share that cache with every other UNet in the process: PyTorch stops compiling after 8 entries and
  silently runs eager, and a graph with frozen weights could serve another UNet of the same shape.
  Each compile therefore gets a private code object, and its cache is freed with it on `remove()`.
- Backends that bake weights in (inductor freezing, OpenVINO, and the CUDA compilers) would run stale
  after a LoRA patches weights in place. A `WeightWatch` recorded at compile time (data pointers,
  version counters, sampled values) is checked before every run and rebuilds, or raises, on a change.
- `torch.compile(backend="openvino")` fails under torch 2.13 (a dynamo guard IndexError), so OpenVINO
  goes through `openvino.convert_model` + `compile_model` behind the same `forward` signature.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
from contextlib import ExitStack, contextmanager
from typing import Callable

import torch

from ...core.registry import ApplyContext, RunContext, Unit, register
from ...run.capabilities import package_available
from ...spec.errors import ConfigError, UnavailableError
from .config import DYNAMO_BACKENDS, CompileConfig, _granularity
from .engines import (
    CompileTarget,
    StaleCompileError,
    WeightWatch,
    _BlockIO,
    _DecoderIO,
    _DynamoEngine,
    _install,
    _ModuleCompilerEngine,
    _OpenVinoEngine,
    _TextEncoderIO,
    _UnetIO,
)

log = logging.getLogger(__name__)

# the layers `blocks` granularity compiles (none nests inside another): what DeepCache's layer walk calls
BLOCK_TYPES = frozenset({"ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D"})


# ---------------------------------------------------------------- backends: probes and builders


def _cxx_compiler() -> str | None:
    names = [os.environ.get("CXX")] + ["g++", "c++", "clang++", "cl"]
    return next((path for path in (shutil.which(n) for n in names if n) if path), None)


def _check_inductor(device: torch.device) -> None:
    from torch._dynamo import is_dynamo_supported

    option_name = "compile.backend=inductor"
    if not is_dynamo_supported():
        raise UnavailableError(option_name, f"torch.compile does not support this Python/PyTorch ({torch.__version__})",
                               "upgrade PyTorch, or use backend openvino")
    if device.type == "cpu" and _cxx_compiler() is None:
        raise UnavailableError(option_name, "inductor needs a C++ compiler on a CPU and none was found",
                               "install g++ or clang (MSVC on Windows), or use backend openvino")
    if device.type == "cuda" and not package_available("triton"):
        raise UnavailableError(option_name, "inductor needs Triton on an NVIDIA GPU", "pip install triton")


def _check_openvino(device: torch.device) -> None:
    option_name = "compile.backend=openvino"
    if device.type != "cpu":
        raise UnavailableError(option_name, f"SDAccel runs OpenVINO on the CPU; this pipeline runs on {device.type}",
                               "use backend inductor (or tensorrt) on a GPU")
    if not package_available("openvino"):
        raise UnavailableError(option_name, "the openvino package is not installed",
                               "pip install openvino (or pip install sdaccel[openvino])")


_CUDA_ONLY = {  # backend -> (module probed, install hint)
    "stable_fast": ("sfast", "pip install stable-fast (a wheel built for your PyTorch and CUDA versions)"),
    "onediff": ("onediff", "pip install onediff oneflow (a OneFlow build for your CUDA version)"),
    "tensorrt": ("torch_tensorrt", "pip install torch-tensorrt (matching your PyTorch version)"),
}


def _check_cuda_only(backend: str, device: torch.device) -> None:
    module_name, install = _CUDA_ONLY[backend]
    option_name = f"compile.backend={backend}"
    if device.type != "cuda":
        raise UnavailableError(option_name, f"{backend} compiles for NVIDIA GPUs (CUDA) only; this pipeline runs on "
                               f"{device.type}", "use backend inductor (freezing on) or openvino on a CPU")
    if not package_available(module_name):
        raise UnavailableError(option_name, f"the {module_name} package is not installed", install)
    if backend == "onediff" and not package_available("oneflow"):
        raise UnavailableError(option_name, "the oneflow package is not installed", install)


def check_backend(cfg: CompileConfig, device: torch.device) -> None:
    """UnavailableError (naming the backend, the reason and the fix) unless `cfg.backend` can run on `device`."""
    if cfg.backend == "inductor":
        _check_inductor(device)
    elif cfg.backend == "openvino":
        _check_openvino(device)
        if cfg.openvino_int8 != "off" and not package_available("nncf"):
            raise UnavailableError(f"compile.openvino_int8={cfg.openvino_int8}", "the nncf package (OpenVINO's "
                                   "quantizer) is not installed", "pip install nncf, or set openvino_int8 off")
    else:
        _check_cuda_only(cfg.backend, device)


def _inductor_backend(cfg: CompileConfig) -> Callable[[], Callable]:
    """Inductor with this unit's settings as per-compile config patches (never process-wide flags)."""
    options = {"freezing": cfg.freezing}

    def make():
        return torch._TorchCompileInductorWrapper(cfg.mode, options, cfg.dynamic)

    return make


def _tensorrt_backend() -> Callable:
    import torch_tensorrt  # noqa: F401  (registers the dynamo backend)
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend("torch_tensorrt")


def _stable_fast_build(target: CompileTarget) -> Callable:
    """stable-fast's documented `compile_unet`, with its memory-format and xformers mutations turned off.

    `compile_unet` replaces `module.forward` with its traced one; that callable is taken back out so this
    unit's own patch stays the only change (its removal then restores the eager module).
    """
    from sfast.compilers.diffusion_pipeline_compiler import CompilationConfig, compile_unet

    config = CompilationConfig.Default()
    config.memory_format = None  # leave weights alone: the channels_last unit owns the layout
    config.enable_xformers = False
    module = target.module
    installed = module.__dict__.get("forward")
    module.__dict__["forward"] = target.eager
    try:
        compile_unet(module, config)
        return module.__dict__["forward"]
    finally:
        module.__dict__["forward"] = installed


def _onediff_build(target: CompileTarget) -> Callable:
    from onediff.infer_compiler import oneflow_compile

    return oneflow_compile(target.module)


def make_engine(cfg: CompileConfig, label: str) -> Callable[[CompileTarget], object]:
    if cfg.backend == "inductor":
        return lambda t: _DynamoEngine(_inductor_backend(cfg), cfg.dynamic, label)
    if cfg.backend == "openvino":
        return lambda t: _OpenVinoEngine(cfg)
    if cfg.backend == "tensorrt":
        return lambda t: _DynamoEngine(_tensorrt_backend, cfg.dynamic, label)
    if cfg.backend == "stable_fast":
        return lambda t: _ModuleCompilerEngine(_stable_fast_build)
    return lambda t: _ModuleCompilerEngine(_onediff_build)


# ---------------------------------------------------------------- per-run reporting


def report_compiles(cfg: CompileConfig, targets: list, before: list, run: RunContext) -> None:
    """Add what this run compiled to the run's counters and notes (compile time apart from run time)."""
    graphs = seconds = rebuilds = eager = calibration = int8 = 0
    built = []
    for target, old in zip(targets, before):
        new = target.counts
        graphs += new.graphs - old.graphs
        seconds += new.compile_s - old.compile_s
        rebuilds += new.rebuilds - old.rebuilds
        eager += new.eager_calls - old.eager_calls
        calibration += new.calibration_calls - old.calibration_calls
        group = target.io.label.split(".")[0]  # blocks granularity: unet.down_blocks.0... -> unet
        if new.graphs != old.graphs:
            int8 += sum(getattr(target.engine, "int8_ops", {}).values())  # the quantized models this target holds
            if group not in built:
                built.append(group)
    if calibration:
        run.count("compile_calibration_calls", calibration)
        run.note(f"compile ({cfg.backend} int8 {cfg.openvino_int8}): {calibration} call(s) ran uncompiled while "
                 "their inputs were recorded to calibrate the int8 model, built when the run ended")
    if graphs:
        run.count("compile_graphs", graphs)
        run.counters["compile_s"] = round(run.counters.get("compile_s", 0.0) + seconds, 3)
        run.note(f"compile ({cfg.backend}): built {graphs} graph(s) for {', '.join(built)} in {seconds:.1f}s, "
                 "included in this run's time" + (f"; int8 {cfg.openvino_int8}: {int8} operations quantized"
                                                 if cfg.openvino_int8 != "off" else ""))
    if rebuilds:
        run.count("compile_rebuilds", rebuilds)
        run.note("compile: weights changed after compiling (LoRA or weight patch); recompiled with the new weights")
    if eager:
        run.count("compile_eager_calls", eager)
        run.note(f"compile: {eager} call(s) ran eager (inputs {cfg.backend} cannot take: ControlNet residuals, or a "
                 "text encoder asked for its hidden states)")


@contextmanager
def _compile_scope(cfg: CompileConfig, targets: list, run: RunContext):
    """Check baked weights once before the run (not per step), then report what the run compiled."""
    before = [t.counts.copy() for t in targets]
    with ExitStack() as stack:
        for target in targets:
            target.ensure_fresh()
            target.in_run = True
            stack.callback(setattr, target, "in_run", False)
        ended = False
        try:
            yield
            ended = True
        finally:
            if ended:
                for target in targets:
                    target.end_run()
            report_compiles(cfg, targets, before, run)


# ---------------------------------------------------------------- the unit


@register
class Compile(Unit):
    config_cls = CompileConfig

    def examples(self) -> list[CompileConfig]:
        """The cheapest real compile on this machine: OpenVINO converts the tiny UNet and decoder in ~10-20 s,
        where inductor's cold C++ build of the tiny UNet takes 2-3 minutes on 2 cores. Both run the same
        wrapper, weight watch and removal code."""
        if package_available("openvino"):
            return [CompileConfig(backend="openvino", dynamic=True, targets="unet+vae")]
        return [CompileConfig(backend="inductor")]

    def check(self, cfg: CompileConfig, ctx: ApplyContext) -> None:
        check_backend(cfg, torch.device(ctx.device))

    def fallback(self, cfg: CompileConfig, ctx: ApplyContext) -> CompileConfig | None:
        """On a machine without the chosen compiler: OpenVINO in float if only its quantizer is missing, else
        inductor (frozen on a CPU), else OpenVINO, else nothing."""
        cpu = torch.device(ctx.device).type == "cpu"
        common = {"dynamic": cfg.dynamic, "targets": cfg.targets, "on_weight_change": cfg.on_weight_change}
        candidates = [CompileConfig(backend="inductor", freezing=cpu, granularity=cfg.granularity, **common)]
        if cfg.granularity != "blocks":
            candidates.append(CompileConfig(backend="openvino", granularity=cfg.granularity, **common))
        if cfg.openvino_int8 != "off":
            candidates.insert(0, dataclasses.replace(cfg, openvino_int8="off"))
        for candidate in candidates:
            if candidate.backend == cfg.backend and candidate.openvino_int8 == cfg.openvino_int8:
                continue
            try:
                self.check(candidate, ctx)
            except UnavailableError:
                continue
            return candidate
        return None

    def run_scope(self, cfg: CompileConfig, handle, run: RunContext):
        return _compile_scope(cfg, handle.info["targets"], run)

    def _apply(self, pipe, cfg: CompileConfig, ctx: ApplyContext, patch) -> None:
        unet = pipe.unet
        granularity = _granularity(cfg, forward_replaced="forward" in unet.__dict__)
        if granularity == "whole" and "forward" in unet.__dict__ and cfg.backend not in DYNAMO_BACKENDS:
            raise ConfigError("CompileConfig.backend", "another optimization replaced the UNet's forward; "
                              f"{cfg.backend} would trace one call of it and freeze its per-call decisions",
                              "use backend inductor with granularity auto or blocks")
        if granularity == "blocks":
            modules = [(f"unet.{name}", block, _BlockIO) for name, block in _unet_blocks(unet)]
        else:
            modules = [("unet", unet, _UnetIO)]
        if "vae" in cfg.targets.split("+"):
            modules.append(("vae_decoder", _vae_decoder(pipe.vae), _DecoderIO))
        if "text_encoder" in cfg.targets.split("+"):
            modules.append(("text_encoder", _text_encoder(pipe), _TextEncoderIO))
        if cfg.backend == "openvino":
            _require_openvino_dtypes(modules)
        if cfg.mode in ("reduce-overhead", "max-autotune") and torch.device(ctx.device).type != "cuda":
            log.info("compile: mode %s adds CUDA graphs, which do nothing on %s", cfg.mode, ctx.device)
        targets = []
        for label, module, io_cls in modules:
            io_factory = functools.partial(io_cls, label=label) if io_cls is _BlockIO else io_cls
            target = CompileTarget(module, io_factory, cfg, make_engine(cfg, label.replace(".", "_")))
            _install(patch, module, target)
            targets.append(target)
        patch.info["targets"] = targets
        patch.info["backend"] = cfg.backend
        patch.info["granularity"] = granularity


def _unet_blocks(unet: torch.nn.Module) -> list:
    """The outermost resnet / attention / resampler layers of the UNet, in module order."""
    found: list = []
    taken: list[str] = []
    for name, module in unet.named_modules():
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue
        if type(module).__name__ in BLOCK_TYPES:
            found.append((name, module))
            taken.append(name)
    return found


def _vae_decoder(vae) -> torch.nn.Module:
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, torch.nn.Module):
        raise ConfigError("CompileConfig.targets", f"this VAE ({type(vae).__name__}) has no decoder module to compile",
                          "use targets unet")
    return decoder


def _text_encoder(pipe) -> torch.nn.Module:
    encoder = getattr(pipe, "text_encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise ConfigError("CompileConfig.targets", f"this pipeline ({type(pipe).__name__}) has no text encoder to "
                          "compile", "use targets unet+vae")
    return encoder


def _require_openvino_dtypes(modules) -> None:
    for label, module, _ in modules:
        dtype = next(module.parameters()).dtype
        if dtype not in (torch.float32, torch.float16):
            raise UnavailableError("compile.backend=openvino", f"the {label} is {str(dtype).replace('torch.', '')}; "
                                   "OpenVINO takes fp32 or fp16 PyTorch models", "use precision fp32 (or fp16) for "
                                   "it, or backend inductor")


def compile_stats(handle) -> dict:
    """Totals since applying, per target: graphs built, compile seconds, rebuilds, eager calls."""
    return {t.io.label: t.counts.copy() for t in handle.info.get("targets", [])}


__all__ = ["CompileConfig", "Compile", "WeightWatch", "StaleCompileError", "compile_stats"]
