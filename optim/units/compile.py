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

import builtins
import functools
import inspect
import logging
import os
import shutil
import time
import types
import warnings
import weakref
from collections import OrderedDict
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..capabilities import package_available
from ..errors import ConfigError, SDAccelError, UnavailableError
from ..fields import option
from ..registry import ApplyContext, OptimizationConfig, RunContext, Stage, Unit, register

log = logging.getLogger(__name__)

BACKENDS = ("inductor", "openvino", "stable_fast", "onediff", "tensorrt")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TARGETS = ("unet", "unet+vae")
GRANULARITIES = ("auto", "whole", "blocks")
DYNAMO_BACKENDS = ("inductor", "tensorrt")  # torch.compile-based: can compile layer by layer
# the layers `blocks` granularity compiles (none nests inside another): what DeepCache's layer walk calls
BLOCK_TYPES = frozenset({"ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D"})
OPENVINO_STATIC_KEEP = 2  # compiled shapes kept per target with dynamic off: CFG batch and post-cutoff batch
_WATCH_SAMPLES = 16  # values sampled per weight tensor to notice `param.data.add_(...)` (no version bump)


class StaleCompileError(SDAccelError):
    """The weights changed after a backend baked them into its compiled graph."""


@dataclass(frozen=True)
class CompileConfig(OptimizationConfig):
    """Which compiler, for which modules, and how it treats sizes and weights."""

    kind: ClassVar[str] = "compile"
    backend: str = option("inductor", "Compiler. inductor: torch.compile, CPU and GPU (needs a C++ compiler on a CPU, "
                          "Triton on a GPU). openvino: CPU only (pip install openvino), ~1.2-1.6x per UNet step on a "
                          "small CPU. stable_fast / onediff / tensorrt: NVIDIA GPUs only. Every backend pauses the "
                          "first run to compile (about 1-2 minutes for a full UNet)", choices=BACKENDS)
    mode: str = option("default", "torch.compile mode (inductor only). reduce-overhead and max-autotune add CUDA "
                       "graphs (no effect on a CPU); max-autotune benchmarks kernels and compiles for much longer",
                       choices=MODES)
    dynamic: bool = option(False, "Compile once for every image size and batch (on) or once per size (off). Off "
                           "gives the fastest code but pauses again for each new size or batch; inductor gives up "
                           f"after 8 sizes and runs eager, openvino keeps the last {OPENVINO_STATIC_KEEP}")
    freezing: bool = option(False, "inductor only: bake the weights into the graph as constants. The one setting "
                            "that speeds up inductor on a CPU (~1.2-1.35x), at the cost of a second copy of the "
                            "prepacked weights; a weight change (LoRA) then forces a recompile")
    targets: str = option("unet", "What to compile: the UNet, or the UNet and the VAE decoder (another compile "
                          "pause; helps large decodes)", choices=TARGETS)
    granularity: str = option("auto", "whole: one graph for the whole UNet (fastest code). blocks: one graph per "
                              "resnet / attention / resampler layer, the glue between them left in Python; needed "
                              "when another optimization (DeepCache) decides per step which layers run, since a "
                              "whole-UNet graph would recompile every step. auto: blocks when another optimization "
                              "has replaced the UNet's forward, whole otherwise. blocks needs backend inductor or "
                              "tensorrt", choices=GRANULARITIES)
    openvino_precision: str = option("f32", "openvino only. f32: exact fp32 math. auto: OpenVINO may compute in "
                                     "bf16 on CPUs with AVX512-BF16/AMX: faster, lossy (~1e-1 difference on "
                                     "random weights)", choices=("f32", "auto"))
    on_weight_change: str = option("recompile", "When weights change in place after compiling (e.g. a LoRA "
                                   "applied to the loaded model) and the backend baked them in: recompile before "
                                   "the next call (another compile pause), or stop with an error", choices=(
                                       "recompile", "error"))

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        if self.mode != "default" and self.backend != "inductor":
            raise ConfigError(f"{owner}.mode", f"{self.mode} applies to backend inductor only, not {self.backend}",
                              "set mode to default")
        if self.freezing and self.backend != "inductor":
            raise ConfigError(f"{owner}.freezing", f"freezing applies to backend inductor only ({self.backend} "
                              "always bakes the weights in)", "turn freezing off")
        if self.granularity == "blocks" and self.backend not in DYNAMO_BACKENDS:
            raise ConfigError(f"{owner}.granularity", f"blocks needs a torch.compile backend "
                              f"({', '.join(DYNAMO_BACKENDS)}); {self.backend} converts the whole UNet",
                              "use granularity auto or whole")
        if self.openvino_precision != "f32" and self.backend != "openvino":
            raise ConfigError(f"{owner}.openvino_precision", f"applies to backend openvino only, not "
                              f"{self.backend}", "leave it at f32")

    @property
    def bakes_weights(self) -> bool:
        """Whether compiled graphs may hold their own copy of the weights (so in-place changes could go unseen)."""
        return self.backend != "inductor" or self.freezing


# ---------------------------------------------------------------- weights


def _sample_coords(shape: tuple, count: int) -> tuple | None:
    """Index tensors picking `count` evenly spaced elements of a tensor of `shape` (no flattening copy)."""
    numel = 1
    for size in shape:
        numel *= size
    if numel == 0:
        return None
    flat = torch.linspace(0, numel - 1, min(count, numel)).round().long()
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return tuple(reversed(coords))


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


class WeightWatch:
    """What a module's weights looked like when a backend baked them in, cheap to compare again.

    Version counters catch `param.add_()`, data pointers catch `param.data = new`, and sampled values
    catch `param.data.add_()` (which bumps no counter). A change touching none of the sampled elements
    through `.data` is the one edit this cannot see; LoRA merges change every element.
    """

    def __init__(self, module: torch.nn.Module):
        self._module = weakref.ref(module)
        self._records = {name: self._record(t) for name, t in self._tensors(module)}

    @staticmethod
    def _tensors(module):
        yield from ((n, t) for n, t in module.named_parameters() if not t.is_meta)
        yield from ((n, t) for n, t in module.named_buffers() if t is not None and not t.is_meta)

    @staticmethod
    def _record(t: torch.Tensor) -> tuple:
        data = t.detach()
        coords = _sample_coords(tuple(data.shape), _WATCH_SAMPLES)
        values = data[coords].clone() if coords is not None else None
        return data.data_ptr(), t._version, data.dtype, data.device, tuple(data.shape), coords, values

    def changed(self) -> str | None:
        """The name of the first tensor that differs from the record, or None."""
        module = self._module()
        if module is None:
            return None
        seen = 0
        for name, t in self._tensors(module):
            seen += 1
            old = self._records.get(name)
            if old is None:
                return name
            ptr, version, dtype, device, shape, coords, values = old
            data = t.detach()
            if (data.data_ptr(), t._version, data.dtype, data.device, tuple(data.shape)) != \
                    (ptr, version, dtype, device, shape):
                return name
            if values is not None and not _same_values(data[coords], values):
                return name
        return None if seen == len(self._records) else "(a tensor was removed)"


# ---------------------------------------------------------------- the modules' call signatures


class _UnetIO:
    """Normalises UNet calls: tensor timesteps (no per-value recompiles), tuple outputs inside the graph."""

    label = "unet"
    # (name, which dims vary with dynamic shapes) for the tensors OpenVINO is given, in order
    OV_INPUTS = (("sample", (0, 2, 3)), ("timestep", (0,)), ("encoder_hidden_states", (0, 1)),
                 ("text_embeds", (0,)), ("time_ids", (0,)))
    _OV_FREE = {"sample", "timestep", "encoder_hidden_states", "added_cond_kwargs", "return_dict"}

    def __init__(self, eager: Callable):
        self.signature = inspect.signature(eager)

    def prepare(self, args, kwargs):
        """(bound arguments with return_dict=False and a tensor timestep, the caller's return_dict)."""
        bound = self.signature.bind(*args, **kwargs)
        return_dict = bound.arguments.get("return_dict", True)
        bound.arguments["return_dict"] = False
        bound.arguments["timestep"] = _timestep_tensor(bound.arguments["timestep"], bound.arguments["sample"])
        return bound, return_dict

    @staticmethod
    def finish(out, return_dict: bool):
        if not return_dict:
            return out
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out[0])

    def ov_tensors(self, bound) -> list | None:
        """The tensors an OpenVINO UNet takes, or None when the call needs what it cannot express."""
        arguments = bound.arguments
        if any(k not in self._OV_FREE and not _is_empty(v) for k, v in arguments.items()):
            return None
        sample = arguments["sample"]
        timestep = arguments["timestep"].reshape(-1).to(sample.device, torch.float32)
        timestep = timestep.expand(sample.shape[0]) if timestep.numel() == 1 else timestep
        tensors = [sample, timestep, arguments["encoder_hidden_states"]]
        added = arguments.get("added_cond_kwargs")
        if added:
            if set(added) != {"text_embeds", "time_ids"}:
                return None
            tensors += [added["text_embeds"], added["time_ids"]]
        return tensors

    @staticmethod
    def trace_key(module: torch.nn.Module, tensors: list) -> tuple:
        """The shape facts a trace bakes in: diffusers' UNet passes explicit upsample sizes only when the
        latent is not a multiple of 2**num_upsamplers, so that must match for a traced model to fit."""
        factor = 2 ** getattr(module, "num_upsamplers", 0)
        return tuple(size % factor == 0 for size in tensors[0].shape[-2:])

    @staticmethod
    def ov_adapter(eager: Callable, module: torch.nn.Module, count: int) -> torch.nn.Module:
        return _UnetAdapter(eager, module, with_added=count == 5)

    @staticmethod
    def ov_output(result: torch.Tensor):
        return (result,)


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, dict) and not value)


def _timestep_tensor(timestep, sample: torch.Tensor) -> torch.Tensor:
    """A Python number as the tensor diffusers' UNet would build from it; tensors pass through."""
    if torch.is_tensor(timestep):
        return timestep
    mps = sample.device.type == "mps"
    if isinstance(timestep, float):
        dtype = torch.float32 if mps else torch.float64
    else:
        dtype = torch.int32 if mps else torch.int64
    return torch.tensor([timestep], dtype=dtype, device=sample.device)


class _DecoderIO:
    """The VAE decoder (`vae.decoder`): one latent in, one image out; slicing/tiling stay in diffusers."""

    label = "vae_decoder"
    OV_INPUTS = (("sample", (0, 2, 3)),)

    def __init__(self, eager: Callable):
        self.signature = inspect.signature(eager)
        self.first = next(iter(self.signature.parameters))  # `sample` (AutoencoderKL) or `x` (Tiny VAE)

    def prepare(self, args, kwargs):
        return self.signature.bind(*args, **kwargs), False

    @staticmethod
    def finish(out, return_dict: bool):
        return out

    def ov_tensors(self, bound) -> list | None:
        if any(k != self.first and not _is_empty(v) for k, v in bound.arguments.items()):
            return None
        return [bound.arguments[self.first]]

    @staticmethod
    def trace_key(module: torch.nn.Module, tensors: list) -> tuple:
        return ()

    @staticmethod
    def ov_adapter(eager: Callable, module: torch.nn.Module, count: int) -> torch.nn.Module:
        return _DecoderAdapter(eager, module)

    @staticmethod
    def ov_output(result: torch.Tensor):
        return result


class _Call:
    """Positional and keyword arguments passed through unchanged (the shape of a BoundArguments)."""

    def __init__(self, args, kwargs):
        self.args, self.kwargs = args, kwargs


class _BlockIO:
    """One UNet layer (resnet, attention, resampler) called exactly as its parent block calls it."""

    def __init__(self, eager: Callable, label: str = "unet block"):
        self.label = label

    def prepare(self, args, kwargs):
        return _Call(args, kwargs), False

    @staticmethod
    def finish(out, return_dict: bool):
        return out


class _UnetAdapter(torch.nn.Module):
    """Plain-tensor UNet signature for tracing; calls the eager forward (the installed one would recurse)."""

    def __init__(self, eager: Callable, unet: torch.nn.Module, with_added: bool):
        super().__init__()
        self.unet = unet  # registered so tracing records its weights as module state
        self._eager = eager
        self._with_added = with_added

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self._with_added else None
        return self._eager(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class _DecoderAdapter(torch.nn.Module):
    def __init__(self, eager: Callable, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder
        self._eager = eager

    def forward(self, sample):
        return self._eager(sample)


# ---------------------------------------------------------------- engines: how each backend builds and calls


@dataclass
class _Counts:
    graphs: int = 0  # compiled graphs built (inductor graphs, OpenVINO conversions, ...)
    compile_s: float = 0.0  # wall time of the calls that built one (the pause the user sees)
    rebuilds: int = 0  # rebuilds forced by a weight change
    eager_calls: int = 0  # calls the backend could not take, run eager instead

    def copy(self) -> "_Counts":
        return _Counts(self.graphs, self.compile_s, self.rebuilds, self.eager_calls)


_ENTRY_SERIAL = iter(range(1, 1 << 62))


def _entry_template(*args, **kwargs):
    return _sdaccel_target(*args, **kwargs)  # noqa: F821  (bound per copy, see _private_entry)


def _private_entry(call: Callable, label: str) -> Callable:
    """A new function with its own code object that calls `call`: dynamo's cache for it is this compile's."""
    name = f"sdaccel_{label}_{next(_ENTRY_SERIAL)}"
    code = _entry_template.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=name)
    scope = {"__builtins__": builtins, "__name__": __name__, "_sdaccel_target": call}
    return types.FunctionType(code, scope, name)


class _CountingBackend:
    """A dynamo backend wrapper that counts the graphs compiled; holds no reference to the model.

    Dynamo keeps backends in a process-wide table, so this must stay small: the target is reached
    through a weak reference only.
    """

    def __init__(self, inner: Callable, target: "_Target"):
        self.inner = inner
        self._target = weakref.ref(target)
        self.compiler_name = getattr(inner, "compiler_name", getattr(inner, "__name__", "backend"))

    def __call__(self, gm, example_inputs, **kwargs):
        compiled = self.inner(gm, example_inputs, **kwargs)  # may raise to make dynamo restart: count successes
        target = self._target()
        if target is not None:
            target.graph_built()
        return compiled

    def __getattr__(self, name):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def _shape_scope(dynamic: bool):
    """With dynamic shapes, no duck sizing while this unit's graphs compile: a square first image must not
    tie height to width (which would recompile for the first non-square size). Set for the call only."""
    if not dynamic:
        return nullcontext()
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(use_duck_shape=False)


class _DynamoEngine:
    """torch.compile with a given dynamo backend (inductor, torch_tensorrt) over a private entry function."""

    def __init__(self, make_backend: Callable[[], Callable], dynamic: bool, label: str):
        self._make_backend = make_backend
        self._dynamic = dynamic
        self._label = label
        self.compiled: Callable | None = None
        self._scope: dict = {}

    def __call__(self, target: "_Target", bound) -> object:
        if self.compiled is None:
            backend = _CountingBackend(self._make_backend(), target)
            entry = _private_entry(target.eager, self._label)
            self._scope = entry.__globals__
            self.compiled = torch.compile(entry, backend=backend, dynamic=self._dynamic)
        try:
            with _shape_scope(self._dynamic):
                return self.compiled(*bound.args, **bound.kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            raise SDAccelError(f"compile.backend={target.cfg.backend}: compiling the {target.io.label} failed "
                               f"({exc}). Turn compile off or choose another backend") from exc

    def reset(self) -> None:
        """Drop the compiled function. Dynamo's guard tables outlive it and hold the entry's globals, where it
        also stores the compiled graphs: blanking the values (dynamo deletes its own names later) frees the
        graphs and the model they reference."""
        self.compiled = None
        for name in self._scope:
            self._scope[name] = None
        self._scope = {}


class _ModuleCompilerEngine:
    """A library that turns the eager callable into a compiled callable at once (stable-fast, OneDiff)."""

    def __init__(self, build: Callable[["_Target"], Callable]):
        self._build = build
        self.compiled: Callable | None = None

    def __call__(self, target: "_Target", bound) -> object:
        if self.compiled is None:
            self.compiled = self._build(target)
            target.graph_built()
        return self.compiled(*bound.args, **bound.kwargs)

    def reset(self) -> None:
        self.compiled = None


class _OpenVinoEngine:
    """openvino.convert_model + compile_model on the CPU, one model for all sizes or one per size.

    Dynamic: one model per `trace_key` (for the UNet: whether the latent divides by its upsampling
    factor; almost always one). Static: one per exact input shapes, the last OPENVINO_STATIC_KEEP kept.
    """

    def __init__(self, cfg: CompileConfig):
        self._dynamic = cfg.dynamic
        self._properties = {"INFERENCE_PRECISION_HINT": "f32"} if cfg.openvino_precision == "f32" else {}
        self.models: OrderedDict = OrderedDict()

    def __call__(self, target: "_Target", bound) -> object:
        tensors = target.io.ov_tensors(bound)
        if tensors is None:
            return _EAGER
        if self._dynamic:  # input element types are fixed in a converted model, shapes are not
            key = (target.io.trace_key(target.module, tensors), tuple(t.dtype for t in tensors))
        else:
            key = tuple((tuple(t.shape), t.dtype) for t in tensors)
        model = self.models.get(key)
        if model is None:
            model = self._build(target, tensors, key)
        else:
            self.models.move_to_end(key)
        arrays = [t.detach().cpu().contiguous().numpy() for t in tensors]
        result = model(arrays, share_inputs=True, share_outputs=False)[0]
        out = torch.from_numpy(result).to(tensors[0].device)
        return target.io.ov_output(out)

    def _build(self, target: "_Target", tensors: list, key):
        import openvino as ov

        shapes = [ov.PartialShape([-1 if (self._dynamic and d in dyn) else s for d, s in enumerate(t.shape)])
                  for t, (_, dyn) in zip(tensors, target.io.OV_INPUTS)]
        adapter = target.io.ov_adapter(target.eager, target.module, len(tensors))
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                # shape-dependent branches are keyed above (trace_key) or only change memory layout
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                example = tuple(t.detach().clone() for t in tensors)
                traced = torch.jit.trace(adapter, example, check_trace=False, strict=False)
                converted = ov.convert_model(traced, example_input=example, input=shapes, share_weights=False)
            model = _openvino_core().compile_model(converted, "CPU", self._properties)
        except Exception as exc:
            raise SDAccelError(f"compile.backend=openvino: converting the {target.io.label} failed ({exc}). "
                               "Turn compile off or use backend inductor") from exc
        target.graph_built()
        self.models[key] = model
        while len(self.models) > OPENVINO_STATIC_KEEP:
            self.models.popitem(last=False)
        log.info("openvino: %s converted for %s", target.io.label,
                 f"all sizes {key}" if self._dynamic else [tuple(t.shape) for t in tensors])
        return model

    def reset(self) -> None:
        self.models.clear()


_EAGER = object()  # an engine's answer meaning "run this call eager"


@functools.lru_cache(maxsize=1)
def _openvino_core():
    import openvino as ov

    return ov.Core()


# ---------------------------------------------------------------- one compiled module


class _Target:
    """One compiled module (the UNet or the VAE decoder): its engine, its weight watch, its counters."""

    def __init__(self, module: torch.nn.Module, io_cls, cfg: CompileConfig, make_engine: Callable):
        self.module = module
        self.eager = module.forward  # whatever is installed now (an earlier unit's patch included)
        self.io = io_cls(self.eager)
        self.cfg = cfg
        self.counts = _Counts()
        self.watch: WeightWatch | None = None
        self.in_run = False
        self._warned_eager = False
        self._busy = False
        self.engine = make_engine(self)

    def graph_built(self) -> None:
        """Called by engines as they build a graph: count it, and remember the weights it bakes in."""
        self.counts.graphs += 1
        if self.cfg.bakes_weights:
            self.watch = WeightWatch(self.module)

    def ensure_fresh(self) -> bool:
        """Check the baked weights; rebuild (or raise) if they changed. True if a rebuild was scheduled."""
        if self.watch is None:
            return False
        changed = self.watch.changed()
        if changed is None:
            return False
        what = f"{self.io.label} weight {changed!r} changed after compiling (a LoRA or weight patch applied in place)"
        if self.cfg.on_weight_change == "error":
            raise StaleCompileError(f"compile.backend={self.cfg.backend}: {what}; the compiled graph still holds the "
                                    "old weights. Apply LoRAs before the compile optimization (re-apply it after a "
                                    "weight change), or set compile.on_weight_change=recompile")
        log.info("compile: %s; rebuilding", what)
        self.engine.reset()
        self.watch = None
        self.counts.rebuilds += 1
        return True

    def __call__(self, args, kwargs):
        if self._busy:  # a backend calling the module back while compiling it: give it the eager forward
            return self.eager(*args, **kwargs)
        if not self.in_run:
            self.ensure_fresh()
        bound, return_dict = self.io.prepare(args, kwargs)
        graphs, start = self.counts.graphs, time.perf_counter()
        self._busy = True
        try:
            out = self.engine(self, bound)
        finally:
            self._busy = False
        if self.counts.graphs != graphs:
            self.counts.compile_s += time.perf_counter() - start
        if out is _EAGER:
            self.counts.eager_calls += 1
            if not self._warned_eager:
                log.warning("compile: %s cannot take the inputs of this %s call (e.g. ControlNet residuals); "
                            "such calls run eager", self.cfg.backend, self.io.label)
                self._warned_eager = True
            return self.eager(*args, **kwargs)
        return self.io.finish(out, return_dict)

    def release(self) -> None:
        """Drop every compiled artifact (graphs, OpenVINO models) and the weight record."""
        self.engine.reset()
        self.watch = None


def _install(patch, module: torch.nn.Module, target: _Target) -> None:
    """Route `module.forward` through `target`; removal deletes the attribute (the class forward returns)."""

    @functools.wraps(target.eager)
    def forward(*args, **kwargs):
        return target(args, kwargs)

    patch.on_remove(target.release)
    patch.set_attr(module, "forward", forward)


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


def _stable_fast_build(target: _Target) -> Callable:
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


def _onediff_build(target: _Target) -> Callable:
    from onediff.infer_compiler import oneflow_compile

    return oneflow_compile(target.module)


def _make_engine(cfg: CompileConfig, label: str) -> Callable[[_Target], object]:
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


def _report(cfg: CompileConfig, targets: list, before: list, run: RunContext) -> None:
    """Add what this run compiled to the run's counters and notes (compile time apart from run time)."""
    graphs = seconds = rebuilds = eager = 0
    built = []
    for target, old in zip(targets, before):
        new = target.counts
        graphs += new.graphs - old.graphs
        seconds += new.compile_s - old.compile_s
        rebuilds += new.rebuilds - old.rebuilds
        eager += new.eager_calls - old.eager_calls
        group = target.io.label.split(".")[0]  # blocks granularity: unet.down_blocks.0... -> unet
        if new.graphs != old.graphs and group not in built:
            built.append(group)
    if graphs:
        run.count("compile_graphs", graphs)
        run.counters["compile_s"] = round(run.counters.get("compile_s", 0.0) + seconds, 3)
        run.note(f"compile ({cfg.backend}): built {graphs} graph(s) for {', '.join(built)} in {seconds:.1f}s, "
                 "included in this run's time")
    if rebuilds:
        run.count("compile_rebuilds", rebuilds)
        run.note("compile: weights changed after compiling (LoRA or weight patch); recompiled with the new weights")
    if eager:
        run.count("compile_eager_calls", eager)
        run.note(f"compile: {eager} call(s) ran eager (inputs {cfg.backend} cannot take, e.g. ControlNet residuals)")


@contextmanager
def _compile_scope(cfg: CompileConfig, targets: list, run: RunContext):
    """Check baked weights once before the run (not per step), then report what the run compiled."""
    before = [t.counts.copy() for t in targets]
    with ExitStack() as stack:
        for target in targets:
            target.ensure_fresh()
            target.in_run = True
            stack.callback(setattr, target, "in_run", False)
        try:
            yield
        finally:
            _report(cfg, targets, before, run)


# ---------------------------------------------------------------- the unit


@register
class Compile(Unit):
    kind = "compile"
    title = "Compile"
    stage = Stage.COMPILE
    config_cls = CompileConfig
    lossless = True

    def examples(self) -> list[CompileConfig]:
        """The cheapest real compile on this machine: OpenVINO converts the tiny UNet and decoder in ~10-20 s,
        where inductor's cold C++ build of the tiny UNet takes 2-3 minutes on 2 cores. Both run the same
        wrapper, weight watch and removal code."""
        if package_available("openvino"):
            return [CompileConfig(backend="openvino", dynamic=True, targets="unet+vae")]
        return [CompileConfig(backend="inductor")]

    def conflict_with(self, cfg: CompileConfig, other) -> str | None:
        if other.kind == "offload" and getattr(other, "mode", "none") != "none":
            return ("offloading moves the UNet's weights between devices on every call, which a compiled graph "
                    "cannot follow; keep either offload or compile")
        if other.kind == "deepcache" and _granularity(cfg, forward_replaced=True) == "whole":
            return (f"DeepCache decides in Python at every step which UNet layers run; {cfg.backend} with "
                    f"granularity {cfg.granularity} would compile the whole UNet and freeze (openvino, "
                    "stable_fast, onediff) or recompile (inductor, whole) that decision. Use backend inductor "
                    "with granularity auto or blocks")
        return super().conflict_with(cfg, other)

    def check(self, cfg: CompileConfig, ctx: ApplyContext) -> None:
        device = torch.device(ctx.device)
        if cfg.backend == "inductor":
            _check_inductor(device)
        elif cfg.backend == "openvino":
            _check_openvino(device)
        else:
            _check_cuda_only(cfg.backend, device)

    def fallback(self, cfg: CompileConfig, ctx: ApplyContext) -> CompileConfig | None:
        """On a machine without the chosen compiler: inductor (frozen on a CPU), else OpenVINO, else nothing."""
        cpu = torch.device(ctx.device).type == "cpu"
        common = {"dynamic": cfg.dynamic, "targets": cfg.targets, "on_weight_change": cfg.on_weight_change}
        candidates = [CompileConfig(backend="inductor", freezing=cpu, granularity=cfg.granularity, **common)]
        if cfg.granularity != "blocks":
            candidates.append(CompileConfig(backend="openvino", granularity=cfg.granularity, **common))
        for candidate in candidates:
            if candidate.backend == cfg.backend:
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
        if cfg.targets == "unet+vae":
            modules.append(("vae_decoder", _vae_decoder(pipe.vae), _DecoderIO))
        if cfg.backend == "openvino":
            _require_openvino_dtypes(modules)
        if cfg.mode in ("reduce-overhead", "max-autotune") and torch.device(ctx.device).type != "cuda":
            log.info("compile: mode %s adds CUDA graphs, which do nothing on %s", cfg.mode, ctx.device)
        targets = []
        for label, module, io_cls in modules:
            io_factory = functools.partial(io_cls, label=label) if io_cls is _BlockIO else io_cls
            target = _Target(module, io_factory, cfg, _make_engine(cfg, label.replace(".", "_")))
            _install(patch, module, target)
            targets.append(target)
        patch.info["targets"] = targets
        patch.info["backend"] = cfg.backend
        patch.info["granularity"] = granularity


def _granularity(cfg: CompileConfig, *, forward_replaced: bool) -> str:
    """The granularity `auto` resolves to: blocks (torch.compile backends only) over a replaced forward."""
    if cfg.granularity != "auto":
        return cfg.granularity
    return "blocks" if forward_replaced and cfg.backend in DYNAMO_BACKENDS else "whole"


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
