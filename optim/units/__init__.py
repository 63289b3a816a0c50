"""Built-in optimizations, one folder each: `config.py` (plain data), `unit.py` (behaviour), helpers beside.

Importing this package does nothing; `load_configs()` registers the config classes (no torch) and
`load_units()` the behaviour, in this canonical registration order.
"""

from __future__ import annotations

import importlib

BUILTIN = ("precision", "attention", "channels_last", "winograd", "deepcache", "tome", "freeu", "vae", "offload",
           "compile")


_APPLY_DOC = """Apply {title} to a diffusers pipeline; `handle.remove()` restores it exactly.

    `config` defaults to `{cls}()`, `device` to where the UNet's weights are and `family` (a name such as
    "sd15") to the one the pipeline's components match. Applying goes after what the pipeline already has
    and refuses a combination the canonical order or the conflicts forbid.

    >>> from sdaccel.optim.testing import build_pipeline
    >>> from sdaccel.optim.units.{kind} import {cls}, apply_{kind}
    >>> pipe = build_pipeline("sd15", tiny=True)
    >>> handle = apply_{kind}(pipe, {example}){skip}
    >>> handle.name{skip}
    '{kind}'
    >>> handle.remove(){skip}
    """


def public_apply(config_cls, example: str, *, skip_example: bool = False):
    """The documented `apply_<kind>(pipe, config=None, *, device=None, family=None)` helper of one technique.

    `example` is the config the docstring's runnable example applies (`skip_example` for ones that take
    minutes, such as a compile)."""

    def apply(pipe, config=None, *, device=None, family=None):
        from ..core.apply import apply as apply_one

        return apply_one(pipe, config if config is not None else config_cls(), device=device, family=family)

    kind = config_cls.kind
    apply.__name__ = apply.__qualname__ = f"apply_{kind}"
    apply.__module__ = f"{__name__}.{kind}"
    apply.__doc__ = _APPLY_DOC.format(title=config_cls.title, cls=config_cls.__name__, kind=kind, example=example,
                                      skip="  # doctest: +SKIP" if skip_example else "")
    return apply


def load_configs() -> None:
    """Register every built-in config class (cheap: no torch)."""
    for name in BUILTIN:
        importlib.import_module(f".{name}.config", __name__)


def load_units() -> None:
    """Register every built-in unit (imports torch and the units' helpers)."""
    load_configs()
    for name in BUILTIN:
        importlib.import_module(f".{name}.unit", __name__)
