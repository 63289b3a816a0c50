"""SDAccel's entries on the A1111/Forge Settings page (`on_ui_settings`): what holds for every generation rather
than for one (the accordion holds the per-generation choices). Read through `value()`, so a setting changed on
the page or through `/sdapi/v1/options` applies to the next generation without a restart.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

SECTION = ("sdaccel", "SDAccel")


@dataclass(frozen=True)
class Setting:
    key: str
    default: object
    label: str
    slider: tuple | None = None  # (minimum, maximum, step) for a number
    field: tuple | None = None  # (config class path, field name): its tooltip is the setting's help line


SETTINGS = (
    Setting("sdaccel_winograd_filter_mb", 0,
            "SDAccel Winograd: memory for transformed filters kept between generations (MB; 0 = automatic)",
            (0, 8192, 64), ("winograd", "filter_cache_mb")),
    Setting("sdaccel_console_stats", True,
            "SDAccel: print what the accordion's units did after each generation to the console"),
)
_DEFAULTS = {s.key: s.default for s in SETTINGS}


def register() -> None:
    """Add the settings to the host's options (called by the host from `on_ui_settings`)."""
    import gradio as gr
    from modules import shared

    for setting in SETTINGS:
        if setting.slider:
            low, high, step = setting.slider
            info = shared.OptionInfo(setting.default, setting.label, gr.Slider,
                                     {"minimum": low, "maximum": high, "step": step}, section=SECTION)
        else:
            info = shared.OptionInfo(setting.default, setting.label, section=SECTION)
        if setting.field:
            info = info.info(_tooltip(*setting.field))
        shared.opts.add_option(setting.key, info)


def _tooltip(kind: str, name: str) -> str:
    from ..optim.spec.fields import describe
    from ..optim.spec.optimization import config_class

    return next(f.tooltip for f in describe(config_class(kind)) if f.name == name)


def value(key: str):
    """The setting's current value in the host, or its default outside a host (or before the page registered it)."""
    shared = sys.modules.get("modules.shared")
    try:
        found = getattr(shared.opts, key)  # the host's Options: the saved value, else the registered default
    except AttributeError:
        found = None
    return _DEFAULTS[key] if found is None else found
