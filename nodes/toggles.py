"""One toggle node per optimization unit, generated from the engine's registry, plus the CFG cutoff.

A toggle takes a pipe and returns a new one with its optimization described in the spec ("clone, then
describe", as ComfyUI's own model patches do): no weights are touched here. The engine applies every
optimization in its canonical order when the sampler runs, whatever order the nodes were wired in.
A unit registered later (e.g. a new kernel) gets its node without any change here.
"""

from __future__ import annotations

from ..optim.spec.optimization import OptimizationConfig, config_classes
from ..optim.spec.pipeline import GenerationRequest
from . import host
from .inputs import split_inputs, ui_fields, values, widget
from .pipe import PIPE, PIPE_TOOLTIP, SDAccelPipe

CATEGORY = "sdaccel/optimizations"
_ID_WORDS = {"deepcache": "DeepCache", "freeu": "FreeU", "vae": "VAE", "cfg": "CFG"}  # casing of node ids


def node_id(kind: str) -> str:
    """`SDAccel` + the unit kind in CamelCase (ids are forever: derived from the kind, never the title)."""
    return "SDAccel" + "".join(_ID_WORDS.get(part, part.capitalize()) for part in kind.split("_"))


class _Toggle:
    """Base of the generated toggle nodes; subclasses set KIND."""

    KIND = ""
    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    FUNCTION = "apply"

    @classmethod
    def config_cls(cls) -> type[OptimizationConfig]:
        return config_classes()[cls.KIND]

    @classmethod
    def fields(cls):
        return ui_fields(cls.config_cls())

    @classmethod
    def INPUT_TYPES(cls):
        required = {"pipe": (PIPE, {"tooltip": PIPE_TOOLTIP})}
        for info in cls.fields():
            required[info.name] = widget(info, tooltip_suffix=host.path_tooltip(cls.KIND, info.name))
        return split_inputs(required, cls.fields())

    def apply(self, pipe: SDAccelPipe, **given):
        fields = values(self.fields(), given)
        for name, value in fields.items():
            if isinstance(value, str):
                fields[name] = host.resolve_model_file(self.KIND, name, value)
        return (pipe.with_optimization(self.config_cls()(**fields)),)


def _description(cfg_cls: type[OptimizationConfig]) -> str:
    doc = " ".join((cfg_cls.__doc__ or "").split())
    quality = "Lossless." if cfg_cls.lossless else "Changes the image (measured; see the stats)."
    conflicts = "".join(f" Cannot combine with {kind}: {why}." for kind, why in cfg_cls.conflicts.items())
    return f"{cfg_cls.title}: {doc} {quality}{conflicts}".strip()


def toggle_nodes() -> dict[str, type]:
    """{node id: class} for every registered optimization unit, in canonical order."""
    nodes = {}
    for kind, cfg_cls in config_classes().items():
        cls = type(node_id(kind), (_Toggle,), {"KIND": kind, "DESCRIPTION": _description(cfg_cls),
                                               "__doc__": f"Toggle node for the {cfg_cls.title} optimization.",
                                               "__module__": __name__})
        nodes[cls.__name__] = cls
    return nodes


def display_name(cls) -> str:
    return f"SDAccel {cls.config_cls().title}"


class SDAccelCFGCutoff:
    """Step/CFG cutoff: stop classifier-free guidance after a fraction (or a step) of the run."""

    CATEGORY = CATEGORY
    DESCRIPTION = ("Stop classifier-free guidance part-way: later steps run the conditional pass only, so the "
                   "UNet batch halves. Lossy (measured). Combines with DeepCache in SDAccel.")
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    FUNCTION = "apply"
    FIELD_NAMES = ("cfg_cutoff", "cfg_cutoff_step")

    @classmethod
    def fields(cls):
        return tuple(info for info in ui_fields(GenerationRequest) if info.name in cls.FIELD_NAMES)

    @classmethod
    def INPUT_TYPES(cls):
        required = {"pipe": (PIPE, {"tooltip": PIPE_TOOLTIP})}
        required.update({info.name: widget(info, empty=True) for info in cls.fields()})
        return {"required": required}

    def apply(self, pipe: SDAccelPipe, **given):
        return (pipe.with_run_settings(**values(self.fields(), given, empty=True)),)
