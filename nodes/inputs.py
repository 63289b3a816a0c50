"""ComfyUI input declarations generated from the engine's field descriptions (`optim/spec/fields.py`).

A field's default, range, step, choices and tooltip are written once, in the engine; the widgets here
are derived from them, so a node can never offer a value the engine would reject, and a changed
limit reaches ComfyUI without touching this package.
"""

from __future__ import annotations

from ..optim.spec.fields import FieldInfo, describe

EMPTY = -1  # widget value standing for an empty (None) optional whole-number field, where allowed
_INT_BOUND = 2**31 - 1  # ComfyUI's frontend caps unbounded INT widgets at 2048; give explicit limits
_FLOAT_STEP = 0.01


def ui_fields(config_cls, *, skip: tuple[str, ...] = ()) -> tuple[FieldInfo, ...]:
    """The fields of `config_cls` a user sets in a node (`ui=False` fields and `skip` left out)."""
    return tuple(info for info in describe(config_cls) if info.ui and info.name not in skip)


def allows_empty(info: FieldInfo) -> bool:
    """Optional whole numbers whose range starts at 0 get -1 for "empty" (e.g. cfg_cutoff_step)."""
    return info.optional and info.kind is int and info.min is not None and info.min >= 0


def widget(info: FieldInfo, *, empty: bool = False, tooltip_suffix: str = "") -> tuple:
    """The `INPUT_TYPES` entry for one field.

    `empty=True` lets an optional whole-number field be left empty with -1 (its default), where empty
    means something of its own (see the field's tooltip); otherwise an optional field shows its
    `ui_default`, the value a person would type.
    """
    tooltip = info.tooltip + tooltip_suffix
    default = info.default if info.default is not None else info.ui_default
    if info.choices is not None:
        return list(info.choices), {"default": default, "tooltip": tooltip}
    if info.kind is bool:
        return "BOOLEAN", {"default": bool(default), "tooltip": tooltip}
    if info.kind is int:
        low = int(info.min) if info.min is not None else -_INT_BOUND
        high = int(info.max) if info.max is not None else _INT_BOUND
        if empty and allows_empty(info):
            low, default = EMPTY, EMPTY
            tooltip += f" ({EMPTY} = empty)"
        return "INT", {"default": int(default if default is not None else max(low, 0)), "min": low, "max": high,
                       "step": int(info.step or 1), "tooltip": tooltip}
    if info.kind is float:
        options = {"default": float(default if default is not None else 0.0), "step": info.step or _FLOAT_STEP,
                   "tooltip": tooltip}
        if info.min is not None:
            options["min"] = float(info.min)
        if info.max is not None:
            options["max"] = float(info.max)
        return "FLOAT", options
    if info.kind is str:
        return "STRING", {"default": default or "", "multiline": info.multiline, "tooltip": tooltip}
    raise TypeError(f"field {info.name!r} of kind {info.kind!r} has no ComfyUI widget")


def widgets(infos, *, empty: bool = False) -> dict:
    return {info.name: widget(info, empty=empty) for info in infos}


def split_inputs(entries: dict, infos) -> dict:
    """INPUT_TYPES from name -> entry: fields added after the node shipped (`late`) go under "optional", so
    prompts saved before them still validate and run with the field's default."""
    late = {info.name for info in infos if info.late}
    out = {"required": {k: v for k, v in entries.items() if k not in late}}
    optional = {k: v for k, v in entries.items() if k in late}
    if optional:
        out["optional"] = optional
    return out


def values(infos, given: dict, *, empty: bool = False) -> dict:
    """Engine field values from widget values (-1 back to None where `empty` applies)."""
    out = {}
    for info in infos:
        if info.name not in given:
            continue
        value = given[info.name]
        if empty and allows_empty(info) and value == EMPTY:
            value = None
        out[info.name] = value
    return out
