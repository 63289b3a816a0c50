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
    choices: tuple | None = None  # the values of a radio
    help: str = ""  # the help line, when no engine field gives one
    field: tuple | None = None  # (config class path, field name): its tooltip is the setting's help line


SETTINGS = (
    Setting("sdaccel_winograd_filter_mb", 0,
            "SDAccel Winograd: memory for transformed filters kept between generations (MB; 0 = automatic)",
            (0, 8192, 64), ("winograd", "filter_cache_mb")),
    Setting("sdaccel_console_stats", True,
            "SDAccel: print what the accordion's units did after each generation to the console"),
    Setting("sdaccel_tab_host_model", "auto", "SDAccel tab: the host's own model while the tab generates",
            choices=("auto", "keep", "one-at-a-time"),
            help="keep: both stay loaded (no reloads, a second copy of the weights); one-at-a-time: the tab unloads "
                 "the host's model and the host's next generation releases the tab's pipeline before reloading it; "
                 "auto: one-at-a-time only when the tab's pipeline would not fit in the memory free now"),
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
        elif setting.choices:
            info = shared.OptionInfo(setting.default, setting.label, gr.Radio, {"choices": list(setting.choices)},
                                     section=SECTION)
        else:
            info = shared.OptionInfo(setting.default, setting.label, section=SECTION)
        if setting.field or setting.help:
            info = info.info(_tooltip(*setting.field) if setting.field else setting.help)
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
