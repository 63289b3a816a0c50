"""Attention backend for the UNet and VAE: PyTorch SDPA, xformers, sliced, sub-quadratic, or plain.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour,
and subquadratic.py (the chunked attention).
"""

from __future__ import annotations

from .. import public_apply
from .config import AttentionConfig

apply_attention = public_apply(AttentionConfig, 'AttentionConfig(backend="sliced")')

__all__ = ["AttentionConfig", "apply_attention"]
