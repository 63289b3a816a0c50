"""Compile backends: torch.compile (inductor), OpenVINO, and the CUDA-only stable-fast / OneDiff / TensorRT.

`config.py` holds the settings (plain data, no torch), `unit.py` the behaviour and engines.py (the compiler back ends).
"""

from __future__ import annotations

from .. import public_apply
from .config import CompileConfig

apply_compile = public_apply(CompileConfig, 'CompileConfig(backend="inductor")', skip_example=True)

__all__ = ["CompileConfig", "apply_compile"]
