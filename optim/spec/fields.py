"""One description per config field (default, range, choices, step, tooltip), read by every UI.

ComfyUI inputs, gradio controls and CLI flags are generated from these descriptions, and the
same description validates values, so a field's limits are written exactly once.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

_META_KEY = "sdaccel"


@dataclass(frozen=True)
class FieldInfo:
    """How one config field is shown and checked. `default` None means "decided per family"."""

    tooltip: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    ui_default: Any = None
    ui: bool = True
    multiline: bool = False
    late: bool = False  # added after the hosts' nodes were published: an optional input, so older prompts still run
    name: str = ""
    kind: type = str
    default: Any = None
    optional: bool = False


def option(default, tooltip: str, *, choices=None, min=None, max=None, step=None, ui_default=None,
           ui: bool = True, multiline: bool = False, late: bool = False):
    """A dataclass field carrying its UI description; use as `steps: int | None = option(None, "...")`.

    `late=True` for a field added to a config after its nodes shipped: declared last, and taken by ComfyUI as an
    optional input, so API prompts and workflows saved before it keep working with its default."""
    info = FieldInfo(tooltip=tooltip, choices=tuple(choices) if choices is not None else None, min=min, max=max,
                     step=step, ui_default=ui_default, ui=ui, multiline=multiline, late=late)
    return dataclasses.field(default=default, metadata={_META_KEY: info})


def _base_kind(annotation) -> tuple[type, bool]:
    """Map an annotation such as `int | None` to (int, optional=True)."""
    if isinstance(annotation, str):
        text = annotation.replace(" ", "")
        optional = "None" in text.split("|")
        core = [t for t in text.split("|") if t != "None"]
        names = {"int": int, "float": float, "bool": bool, "str": str}
        return names.get(core[0], object) if len(core) == 1 else object, optional
    args = typing.get_args(annotation)
    if args:
        optional = type(None) in args
        core = [a for a in args if a is not type(None)]
        return (core[0] if len(core) == 1 and isinstance(core[0], type) else object), optional
    return (annotation if isinstance(annotation, type) else object), False


def describe(cls) -> tuple[FieldInfo, ...]:
    """The described fields of a config class, in declaration order, with name/kind/default filled in."""
    out = []
    for f in dataclasses.fields(cls):
        info = f.metadata.get(_META_KEY)
        if info is None:
            continue
        kind, optional = _base_kind(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(dataclasses.replace(info, name=f.name, kind=kind, default=default, optional=optional))
    return tuple(out)


def _check(owner: str, info: FieldInfo, value):
    """Return the value coerced to the field's kind, or raise ConfigError naming the field and the fix."""
    where = f"{owner}.{info.name}"
    if value is None:
        if info.optional or info.default is None:
            return None
        raise ConfigError(where, "must be set", f"use a value such as {info.default!r}")
    kind = info.kind
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, f"expected true/false, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise ConfigError(where, f"expected a whole number, got {value!r}")
        value = int(value)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, f"expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(where, f"is {value!r}", "use a finite number")
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(where, f"expected text, got {type(value).__name__}")
    if info.choices is not None and value not in info.choices:
        raise ConfigError(where, f"{value!r} is not one of {', '.join(map(str, info.choices))}",
                          "pick one of the listed values")
    if info.min is not None and value < info.min:
        raise ConfigError(where, f"{value!r} is below the minimum {info.min}", f"use a value >= {info.min}")
    if info.max is not None and value > info.max:
        raise ConfigError(where, f"{value!r} is above the maximum {info.max}", f"use a value <= {info.max}")
    return value


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_text(owner: str, info: FieldInfo, text: str):
    """A field's value from text (a CLI flag, a query string), strictly: `ture` is an error, not False."""
    where = f"{owner}.{info.name}"
    raw = text.strip()
    if info.kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(where, f"{text!r} is not true or false", f"write one of {', '.join(_TRUE + _FALSE)}")
    if info.kind in (int, float):
        try:
            return info.kind(raw)
        except ValueError:
            what = "a whole number" if info.kind is int else "a number"
            raise ConfigError(where, f"{text!r} is not {what}", f"write {what} such as {info.default!r}") from None
    return raw


@dataclass(frozen=True)
class Config:
    """Frozen, validated settings. Subclasses declare fields with `option(...)`."""

    def __post_init__(self):
        owner = type(self).__name__
        for info in describe(type(self)):
            value = _check(owner, info, getattr(self, info.name))
            object.__setattr__(self, info.name, value)

    def with_(self, **changes):
        """A new instance with `changes` applied (validated); this one is untouched."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"{type(self).__name__}.{unknown[0]}", "no such field",
                              f"valid fields: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get(_META_KEY)}

    def changed(self) -> dict:
        """The described fields whose values differ from the class defaults, in declaration order."""
        return {info.name: getattr(self, info.name) for info in describe(type(self))
                if getattr(self, info.name) != info.default}

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ConfigError(cls.__name__, f"expected a mapping of field names to values, got "
                              f"{type(data).__name__} {data!r:.60}", 'write it as {"field": value, ...}')
        names = {info.name for info in describe(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}.{unknown[0]}", "no such field",
                              f"valid fields: {', '.join(sorted(names))}")
        return cls(**data)

