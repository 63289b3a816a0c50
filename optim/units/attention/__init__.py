"""Attention backend for the UNet and VAE: PyTorch SDPA, xformers, sliced, sub-quadratic, or plain.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour,
and subquadratic.py (the chunked attention).
"""

from __future__ import annotations

from .config import AttentionConfig


def apply_attention(pipe, config: AttentionConfig | None = None, *, device=None, family=None):
    """Apply this optimization to a diffusers pipeline; `handle.remove()` restores it exactly.

    `device` defaults to where the UNet's weights are and `family` (a name such as "sd15") to the one
    the pipeline's components match.

    >>> from sdaccel.optim.testing import build_pipeline
    >>> from sdaccel.optim.units.attention import AttentionConfig, apply_attention
    >>> pipe = build_pipeline("sd15", tiny=True)
    >>> handle = apply_attention(pipe, AttentionConfig(backend="sliced"))
    >>> handle.name
    'attention'
    >>> handle.remove()
    """
    from ...core.apply import apply

    return apply(pipe, config if config is not None else AttentionConfig(), device=device, family=family)


__all__ = ["AttentionConfig", "apply_attention"]
