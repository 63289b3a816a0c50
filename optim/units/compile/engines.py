"""The machinery behind the compile unit: weight watches, call signatures, engines, compiled targets.

Kept apart from the unit (optim/units/compile.py) so each file has one job: this one knows how a module
is compiled and called; the unit decides what to compile and reports it.
"""

from __future__ import annotations

import builtins
import functools
import inspect
import logging
import time
import types
import warnings
import weakref
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from ...spec.errors import SDAccelError
from .config import OPENVINO_STATIC_KEEP

log = logging.getLogger(__name__)

_WATCH_SAMPLES = 16  # values sampled per weight tensor to notice `param.data.add_(...)` (no version bump)


class StaleCompileError(SDAccelError):
    """The weights changed after a backend baked them into its compiled graph."""


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


def _version(t: torch.Tensor) -> int | None:
    """The in-place version counter; None for inference tensors (a host loading under inference_mode), which keep
    none: for those the data pointer and the sampled values tell a change."""
    return None if t.is_inference() else t._version


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
        return data.data_ptr(), _version(t), data.dtype, data.device, tuple(data.shape), coords, values

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
            if (data.data_ptr(), _version(t), data.dtype, data.device, tuple(data.shape)) != \
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
    def ov_output(results: list):
        return (results[0],)


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


class _OneShapeIO:
    """What the decoder and the text encoder share: a module whose traced graph holds for every input size (no
    shape facts to key it by), called with its first parameter as the one tensor it converts."""

    def __init__(self, eager: Callable):
        self.signature = inspect.signature(eager)
        self.first = next(iter(self.signature.parameters))

    @staticmethod
    def trace_key(module: torch.nn.Module, tensors: list) -> tuple:
        return ()


class _DecoderIO(_OneShapeIO):
    """The VAE decoder (`vae.decoder`): one latent in, one image out; slicing/tiling stay in diffusers. Its first
    parameter is `sample` (AutoencoderKL) or `x` (Tiny VAE)."""

    label = "vae_decoder"
    OV_INPUTS = (("sample", (0, 2, 3)),)

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
    def ov_adapter(eager: Callable, module: torch.nn.Module, count: int) -> torch.nn.Module:
        return _DecoderAdapter(eager, module)

    @staticmethod
    def ov_output(results: list):
        return results[0]


class _TextEncoderIO(_OneShapeIO):
    """A text encoder called with token ids only (SD 1.x/2.x and Taiyi prompts): its last hidden state and pooled
    output. Calls asking for more (hidden states for clip skip, SDXL's penultimate layer, an attention mask) run
    eager, as their own call signature says."""

    label = "text_encoder"
    OV_INPUTS = (("input_ids", (0, 1)),)

    def prepare(self, args, kwargs):
        bound = self.signature.bind(*args, **kwargs)
        return bound, self._arguments(bound).get("return_dict", None) is not False

    def _arguments(self, bound) -> dict:
        """The call's arguments with `**kwargs` spread out (transformers 5 takes return_dict and the output flags
        through them)."""
        found = dict(bound.arguments)
        for name, param in self.signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                found.update(found.pop(name, {}))
        return found

    @staticmethod
    def finish(out, return_dict: bool):
        if isinstance(out, tuple) and return_dict:  # the OpenVINO model's outputs, as the module would return them
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            return BaseModelOutputWithPooling(last_hidden_state=out[0], pooler_output=out[1])
        return out

    def ov_tensors(self, bound) -> list | None:
        arguments = self._arguments(bound)
        ids = arguments.get(self.first)
        settled = (self.first, "return_dict")  # False flags (no hidden states, no attentions) ask for nothing more
        if ids is None or any(k not in settled and v is not False and not _is_empty(v) for k, v in arguments.items()):
            return None
        return [ids]

    @staticmethod
    def ov_adapter(eager: Callable, module: torch.nn.Module, count: int) -> torch.nn.Module:
        return _TextEncoderAdapter(eager, module)

    @staticmethod
    def ov_output(results: list):
        return tuple(results[:2])


class PlainCall:
    """Positional and keyword arguments passed through unchanged (the shape of a BoundArguments)."""

    def __init__(self, args, kwargs):
        self.args, self.kwargs = args, kwargs


class _BlockIO:
    """One UNet layer (resnet, attention, resampler) called exactly as its parent block calls it."""

    def __init__(self, eager: Callable, label: str = "unet block"):
        self.label = label

    def prepare(self, args, kwargs):
        return PlainCall(args, kwargs), False

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


class _TextEncoderAdapter(torch.nn.Module):
    def __init__(self, eager: Callable, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self._eager = eager

    def forward(self, input_ids):
        out = self._eager(input_ids, return_dict=False)
        return out[0], out[1]


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
    calibration_calls: int = 0  # calls run eager while their inputs were recorded to calibrate int8

    def copy(self) -> "_Counts":
        return _Counts(self.graphs, self.compile_s, self.rebuilds, self.eager_calls, self.calibration_calls)


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

    def __init__(self, inner: Callable, target: "CompileTarget"):
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

    def __call__(self, target: "CompileTarget", bound) -> object:
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

    def __init__(self, build: Callable[["CompileTarget"], Callable]):
        self._build = build
        self.compiled: Callable | None = None

    def __call__(self, target: "CompileTarget", bound) -> object:
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
    With int8 on, NNCF quantizes the converted model before it is compiled (`int8.py`); `full` first records
    a run's inputs (that run stays eager) and builds the quantized model when the run ends.
    """

    def __init__(self, cfg):  # cfg: CompileConfig (optim/units/compile.py)
        self._dynamic = cfg.dynamic
        self._properties = {"INFERENCE_PRECISION_HINT": "f32"} if cfg.openvino_precision == "f32" else {}
        self._int8 = cfg.openvino_int8
        self.models: OrderedDict = OrderedDict()
        self.calibration: dict = {}  # key -> recorded input tensors of eager calls (int8 full), until built
        self.int8_ops: dict = {}  # key -> quantized operations in the built model (what the stats report)
        self._failed = ""  # why building the int8 model at the end of a run failed (raised on the next call)

    def _key(self, target: "CompileTarget", tensors: list) -> tuple:
        if self._dynamic:  # input element types are fixed in a converted model, shapes are not
            return target.io.trace_key(target.module, tensors), tuple(t.dtype for t in tensors)
        return tuple((tuple(t.shape), t.dtype) for t in tensors)

    def __call__(self, target: "CompileTarget", bound) -> object:
        if self._failed:
            raise SDAccelError(self._failed)
        tensors = target.io.ov_tensors(bound)
        if tensors is None:
            return _EAGER
        key = self._key(target, tensors)
        model = self.models.get(key)
        if model is None and self._int8 == "full":
            self.calibration.setdefault(key, []).append([t.detach().to("cpu", copy=True) for t in tensors])
            target.counts.calibration_calls += 1
            return _CALIBRATING
        if model is None:
            model = self._build(target, tensors, key)
        else:
            self.models.move_to_end(key)
        arrays = [t.detach().cpu().contiguous().numpy() for t in tensors]
        results = model(arrays, share_inputs=True, share_outputs=False)
        device = tensors[0].device
        return target.io.ov_output([torch.from_numpy(results[i]).to(device) for i in range(len(model.outputs))])

    def end_run(self, target: "CompileTarget") -> None:
        """After a run that recorded int8 calibration inputs: build the quantized model for each recorded key."""
        for key in list(self.calibration):  # recorded only for keys without a model; popped when built
            samples = self.calibration.pop(key)
            start = time.perf_counter()
            try:
                self._build(target, samples[0], key, samples)
            except SDAccelError as exc:
                self._failed = str(exc)
                log.warning("%s", exc)
                return
            target.counts.compile_s += time.perf_counter() - start

    def _build(self, target: "CompileTarget", tensors: list, key, calibration: list | None = None):
        from .int8 import quantize
        from .telemetry import import_openvino, no_telemetry

        ov = import_openvino()

        shapes = [ov.PartialShape([-1 if (self._dynamic and d in dyn) else s for d, s in enumerate(t.shape)])
                  for t, (_, dyn) in zip(tensors, target.io.OV_INPUTS)]
        adapter = target.io.ov_adapter(target.eager, target.module, len(tensors))
        step = "converting"
        try:
            with no_telemetry(), torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                # shape-dependent branches are keyed above (trace_key) or only change memory layout
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                example = tuple(t.detach().clone() for t in tensors)
                traced = torch.jit.trace(adapter, example, check_trace=False, strict=False)
                converted = ov.convert_model(traced, example_input=example, input=shapes, share_weights=False)
            if self._int8 != "off":
                step = f"quantizing (int8 {self._int8})"
                with no_telemetry():
                    converted, self.int8_ops[key] = quantize(converted, self._int8, calibration)
            model = _openvino_core().compile_model(converted, "CPU", self._properties)
        except Exception as exc:
            raise SDAccelError(f"compile.backend=openvino: {step} the {target.io.label} failed ({exc}). "
                               "Turn compile off, set openvino_int8 off, or use backend inductor") from exc
        target.graph_built()
        self.models[key] = model
        while len(self.models) > OPENVINO_STATIC_KEEP:
            self.models.popitem(last=False)
        log.info("openvino: %s converted for %s%s", target.io.label,
                 f"all sizes {key}" if self._dynamic else [tuple(t.shape) for t in tensors],
                 f", int8 {self._int8} ({self.int8_ops[key]} operations quantized)" if self._int8 != "off" else "")
        return model

    def reset(self) -> None:
        """Drop the built models: a weight change rebuilds them (int8 full records a run with the new weights first)."""
        self.models.clear()
        self._failed = ""


_EAGER = object()  # an engine's answer meaning "run this call eager"
_CALIBRATING = object()  # "run this call eager: its inputs were recorded to calibrate int8"


@functools.lru_cache(maxsize=1)
def _openvino_core():
    from .telemetry import import_openvino

    return import_openvino().Core()


# ---------------------------------------------------------------- one compiled module


class CompileTarget:
    """One compiled module (the UNet or the VAE decoder): its engine, its weight watch, its counters."""

    def __init__(self, module: torch.nn.Module, io_cls, cfg, make_engine: Callable,  # cfg: CompileConfig
                 eager: Callable | None = None):
        self.module = module
        # what the compiled graph computes: whatever forward is installed now (an earlier unit's patch included),
        # or a host's plain-tensor call of its own module (optim/native/compile.py)
        self.eager = eager or module.forward
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
        if out is _CALIBRATING:
            return self.eager(*args, **kwargs)
        if out is _EAGER:
            self.counts.eager_calls += 1
            if not self._warned_eager:
                log.warning("compile: %s cannot take the inputs of this %s call (e.g. ControlNet residuals); "
                            "such calls run eager", self.cfg.backend, self.io.label)
                self._warned_eager = True
            return self.eager(*args, **kwargs)
        return self.io.finish(out, return_dict)

    def end_run(self) -> None:
        """A run ended normally: engines that build from what the run recorded (int8 calibration) do it now."""
        finish = getattr(self.engine, "end_run", None)
        if finish is not None:
            self._busy = True  # tracing calls the module's forward: let those calls through to eager
            try:
                finish(self)
            finally:
                self._busy = False

    def release(self) -> None:
        """Drop every compiled artifact (graphs, OpenVINO models) and the weight record."""
        self.engine.reset()
        self.watch = None


def _install(patch, module: torch.nn.Module, target: CompileTarget) -> None:
    """Route `module.forward` through `target`; removal deletes the attribute (the class forward returns)."""

    @functools.wraps(target.eager)
    def forward(*args, **kwargs):
        return target(args, kwargs)

    patch.on_remove(target.release)
    patch.set_attr(module, "forward", forward)
