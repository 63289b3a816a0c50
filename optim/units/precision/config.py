"""Precision settings (per-component dtypes, TF32): plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...spec.fields import option
from ...spec.optimization import OptimizationConfig, Stage, register_config

DTYPE_CHOICES = ("auto", "half", "fp32", "fp16", "bf16")


@register_config
@dataclass(frozen=True)
class PrecisionConfig(OptimizationConfig):
    """Per-component dtypes. `auto`: fp16 on CUDA/MPS (SDXL's VAE stays fp32), fp32 on a CPU."""

    kind: ClassVar[str] = "precision"
    stage: ClassVar[Stage] = Stage.PRECISION
    title: ClassVar[str] = "Precision"
    lossless: ClassVar[bool] = False
    unet: str = option("auto", "UNet dtype. auto: fp16 on CUDA/MPS, fp32 on CPU. half: the half precision this "
                       "machine runs natively (fp16 on CUDA/MPS, bf16 on a CPU with AVX512-BF16/AMX, else fp32). "
                       "fp16/bf16 halve UNet memory and time on GPUs and CPUs with native bf16; small, measured "
                       "changes in the image", choices=DTYPE_CHOICES)
    text_encoder: str = option("auto", "Text encoder dtype(s). auto: fp16 on CUDA/MPS, fp32 on CPU. half: as for "
                               "the UNet", choices=DTYPE_CHOICES)
    vae: str = option("auto", "VAE dtype. auto: fp32 for SDXL (its VAE overflows in fp16 unless you use the "
                      "fp16-fix VAE) and on CPU, fp16 otherwise. half: as for the UNet", choices=DTYPE_CHOICES)
    allow_emulated: bool = option(False, "Allow fp16/bf16 on a CPU without native support: correct but 10-40x "
                                  "slower. For tests and comparisons only")
    vae_auto_upcast: bool = option(True, "If a half-precision VAE decode overflows (NaN/inf: black or noisy "
                                   "images), decode that image again in fp32 and say so once")
    tf32: str = option("auto", "TensorFloat-32 matmuls/convolutions for fp32 math on NVIDIA Ampere+ GPUs, set for "
                       "the run only and restored after. auto leaves PyTorch's settings; on: faster, ~3 fewer "
                       "significant digits; off: exact fp32. The SDXL guide saw ~7% less memory with cuDNN TF32 "
                       "off on a 3090", choices=("auto", "on", "off", "matmul_only", "cudnn_only"))
