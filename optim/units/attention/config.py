"""Attention backend settings: plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...spec.fields import option
from ...spec.optimization import OptimizationConfig, Stage, register_config

BACKENDS = ("sdpa", "xformers", "sliced", "sub_quadratic", "baseline")


@register_config
@dataclass(frozen=True)
class AttentionConfig(OptimizationConfig):
    """Which attention implementation runs, and its chunking knobs."""

    kind: ClassVar[str] = "attention"
    stage: ClassVar[Stage] = Stage.ATTENTION
    title: ClassVar[str] = "Attention backend"
    lossless: ClassVar[bool] = True
    backend: str = option("sdpa", "sdpa: PyTorch's fused attention, the default since PyTorch 2 (A1111 "
                          "--opt-sdp-attention). xformers: memory-efficient kernels, NVIDIA GPUs only (--xformers). "
                          "sliced: one slice of heads at a time, lower peak memory, slower (--opt-split-attention). "
                          "sub_quadratic: query/key chunks with an online softmax, lowest peak memory "
                          "(--opt-sub-quad-attention). baseline: plain matmul-softmax-matmul", choices=BACKENDS)
    slice_size: int = option(0, "sliced: batch*heads handled per slice (0 = half of them)", min=0, max=1024, step=1)
    query_chunk: int = option(1024, "sub_quadratic: queries per chunk (smaller = less memory, more overhead)",
                              min=16, max=65536, step=16)
    kv_chunk: int = option(0, "sub_quadratic: keys per chunk (0 = about sqrt(keys), at least 512)", min=0,
                           max=65536, step=16)
    vae: bool = option(True, "Also use this backend in the VAE's attention (the VAE mid block attends over every "
                       "pixel of the latent: a large share of decode memory at high resolutions)")
