"""Compile backends: torch.compile (inductor), OpenVINO, and the CUDA-only stable-fast / OneDiff / TensorRT.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour and engines.py (the compiler back ends).
"""

from __future__ import annotations

from .config import CompileConfig


def apply_compile(pipe, config: CompileConfig | None = None, *, device=None, family=None):
    """Apply this optimization to a diffusers pipeline; `handle.remove()` restores it exactly.

    `device` defaults to where the UNet's weights are and `family` (a name such as "sd15") to the one
    the pipeline's components match.

    >>> from sdaccel.optim.testing import build_pipeline
    >>> from sdaccel.optim.units.compile import CompileConfig, apply_compile
    >>> pipe = build_pipeline("sd15", tiny=True)
    >>> handle = apply_compile(pipe, CompileConfig(backend="inductor"))  # doctest: +SKIP (a compile takes minutes)
    >>> handle.name  # doctest: +SKIP
    'compile'
    >>> handle.remove()  # doctest: +SKIP (a compile takes minutes)
    """
    from ...core.apply import apply

    return apply(pipe, config if config is not None else CompileConfig(), device=device, family=family)


__all__ = ["CompileConfig", "apply_compile"]
