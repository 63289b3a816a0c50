"""VAE variants: the fp16-fix VAE, the Tiny VAE (TAESD / TAESDXL), and sliced / tiled decoding.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour and files.py (reading VAE weight files).
"""

from __future__ import annotations

from .config import VaeConfig


def apply_vae(pipe, config: VaeConfig | None = None, *, device=None, family=None):
    """Apply this optimization to a diffusers pipeline; `handle.remove()` restores it exactly.

    `device` defaults to where the UNet's weights are and `family` (a name such as "sd15") to the one
    the pipeline's components match.

    >>> from sdaccel.optim.testing import build_pipeline
    >>> from sdaccel.optim.units.vae import VaeConfig, apply_vae
    >>> pipe = build_pipeline("sd15", tiny=True)
    >>> handle = apply_vae(pipe, VaeConfig(slicing=True))
    >>> handle.name
    'vae'
    >>> handle.remove()
    """
    from ...core.apply import apply

    return apply(pipe, config if config is not None else VaeConfig(), device=device, family=family)


__all__ = ["VaeConfig", "apply_vae"]
