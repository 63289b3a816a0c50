"""Attention backend for the UNet and VAE: PyTorch SDPA, xformers, sliced, sub-quadratic, or plain.

All compute the same softmax attention (lossless up to rounding); they trade speed for peak memory.
diffusers' `set_attention_backend` does not reach SD/SDXL UNets, so SDAccel sets attention
processors, remembering every previous processor so removal restores them exactly.
"""

from __future__ import annotations

import torch

from ...core.registry import ApplyContext, Unit, register
from ...run.capabilities import package_available
from ...spec.errors import UnavailableError
from .config import AttentionConfig


def make_processor(cfg: AttentionConfig, module=None):
    from diffusers.models import attention_processor as ap

    if cfg.backend == "sdpa":
        return ap.AttnProcessor2_0()
    if cfg.backend == "baseline":
        return ap.AttnProcessor()
    if cfg.backend == "xformers":
        return ap.XFormersAttnProcessor()
    if cfg.backend == "sliced":
        heads = 8
        if module is not None:
            heads = max((m.heads for m in module.modules() if hasattr(m, "heads") and hasattr(m, "processor")),
                        default=8)
        return ap.SlicedAttnProcessor(cfg.slice_size or max(1, heads // 2))
    from .subquadratic import SubQuadraticAttnProcessor

    return SubQuadraticAttnProcessor(cfg.query_chunk, cfg.kv_chunk)


def _set_processors(module, processor, patch) -> None:
    previous = dict(module.attn_processors)
    module.set_attn_processor(processor)
    patch.on_remove(lambda: module.set_attn_processor(previous))


@register
class Attention(Unit):
    config_cls = AttentionConfig

    def examples(self) -> list[AttentionConfig]:
        return [AttentionConfig(backend="sub_quadratic", query_chunk=16, kv_chunk=16),
                AttentionConfig(backend="sliced", slice_size=1), AttentionConfig(backend="baseline", vae=False)]

    def check(self, cfg: AttentionConfig, ctx: ApplyContext) -> None:
        if cfg.backend == "xformers":
            if torch.device(ctx.device).type != "cuda":
                raise UnavailableError("attention.backend=xformers", "xformers runs on NVIDIA GPUs only",
                                       "use sdpa")
            if not package_available("xformers"):
                raise UnavailableError("attention.backend=xformers", "the xformers package is not installed",
                                       "pip install xformers (matching your torch), or use sdpa")
        if cfg.backend == "sdpa" and not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            raise UnavailableError("attention.backend=sdpa", "this PyTorch has no scaled_dot_product_attention",
                                   "upgrade to PyTorch 2 or use sub_quadratic")

    def fallback(self, cfg: AttentionConfig, ctx: ApplyContext) -> AttentionConfig:
        return cfg.with_(backend="sdpa")

    def _apply(self, pipe, cfg: AttentionConfig, ctx: ApplyContext, patch) -> None:
        _set_processors(pipe.unet, make_processor(cfg, pipe.unet), patch)
        if cfg.vae and hasattr(pipe.vae, "attn_processors") and pipe.vae.attn_processors:
            _set_processors(pipe.vae, make_processor(cfg, pipe.vae), patch)
