"""FreeU (Si et al., 2023, arXiv 2309.11497): re-weight the UNet's backbone and skip features.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour.
"""

from __future__ import annotations

from .config import FreeUConfig


def apply_freeu(pipe, config: FreeUConfig | None = None, *, device=None, family=None):
    """Apply this optimization to a diffusers pipeline; `handle.remove()` restores it exactly.

    `device` defaults to where the UNet's weights are and `family` (a name such as "sd15") to the one
    the pipeline's components match.

    >>> from sdaccel.optim.testing import build_pipeline
    >>> from sdaccel.optim.units.freeu import FreeUConfig, apply_freeu
    >>> pipe = build_pipeline("sd15", tiny=True)
    >>> handle = apply_freeu(pipe, FreeUConfig())
    >>> handle.name
    'freeu'
    >>> handle.remove()
    """
    from ...core.apply import apply

    return apply(pipe, config if config is not None else FreeUConfig(), device=device, family=family)


__all__ = ["FreeUConfig", "apply_freeu"]
