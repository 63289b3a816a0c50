"""gradio controls generated from the engine's field descriptions (`optim/spec/fields.py`), the way nodes/inputs.py
builds ComfyUI widgets: a field's default, range, choices and tooltip are written once, in the engine.

Only constructor arguments gradio 3.41 (A1111), 4.40 (Forge) and current gradio all take are used.
"""

from __future__ import annotations

from ..optim.spec.fields import FieldInfo, describe

_SLIDER_SPAN = 4096  # a range wider than this gets a number box, not a slider


def ui_fields(cls, *, skip=()) -> tuple[FieldInfo, ...]:
    return tuple(info for info in describe(cls) if info.ui and info.name not in skip)


def initial(info: FieldInfo):
    """What a control starts at: the default, else the value a person would type (`ui_default`)."""
    if info.default is not None:
        return info.default
    if info.ui_default is not None:
        return info.ui_default
    return "" if info.kind is str else (0 if info.kind in (int, float) else False)


def label(info: FieldInfo) -> str:
    return info.name.replace("_", " ").capitalize()


def control(gr, info: FieldInfo, *, value=None, elem_id: str | None = None, group: str = ""):
    """One gradio component for `info` (`gr` is the gradio module, passed in so importing this does no work).

    `group` (a unit's title) leads the label: A1111 and Forge save and restore a tab's control values by
    "tab/label" (their ui-config.json), so two controls labelled "Vae" would receive each other's values."""
    value = initial(info) if value is None else value
    common = {"label": f"{group}: {label(info)}" if group else label(info), "info": info.tooltip, "elem_id": elem_id}
    if info.choices is not None:
        return gr.Dropdown(choices=list(info.choices), value=value, **common)
    if info.kind is bool:
        return gr.Checkbox(value=bool(value), **common)
    if info.kind in (int, float):
        bounded = info.min is not None and info.max is not None and info.max - info.min <= _SLIDER_SPAN
        if bounded:
            step = info.step or (1 if info.kind is int else 0.01)
            return gr.Slider(minimum=info.min, maximum=info.max, step=step, value=value, **common)
        return gr.Number(value=value, precision=0 if info.kind is int else None, **common)
    return gr.Textbox(value=value or "", lines=3 if info.multiline else 1, **common)


def value_of(info: FieldInfo, raw):
    """An engine value from what a control returned (gradio numbers are floats; an empty box is None)."""
    if raw is None or raw == "" and info.kind is not str:
        return None if info.optional or info.default is None else info.default
    if info.kind is int and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    return raw
