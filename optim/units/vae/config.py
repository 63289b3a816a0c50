"""VAE variant settings: plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...spec.fields import option
from ...spec.optimization import OptimizationConfig, Stage, register_config

SYNTHETIC = "synthetic"  # VaeConfig.path meaning random weights (benchmarks; see optim/testing)
VARIANTS = ("default", "fp16_fix", "tiny")


@register_config
@dataclass(frozen=True)
class VaeConfig(OptimizationConfig):
    """Which VAE decodes (and encodes img2img inputs), and how it splits the work."""

    kind: ClassVar[str] = "vae"
    stage: ClassVar[Stage] = Stage.VAE
    title: ClassVar[str] = "VAE variant"
    lossless: ClassVar[bool] = False  # tiny is lossy and tiling near-lossless; slicing and fp16_fix at fp32 are exact
    variant: str = option("default", "default: the model's own VAE. fp16_fix: a VAE fine-tuned to run in fp16 "
                          "without NaNs/black images (~15% less memory than upcasting the SDXL VAE to fp32; "
                          "near-identical images). tiny: TAESD/TAESDXL (~1M parameters): far less memory and "
                          "time, slightly more contrast and softer detail", choices=VARIANTS)
    path: str = option("", "Weights for fp16_fix (diffusers AutoencoderKL folder or single-file VAE such as "
                       "sdxl_vae.safetensors) or tiny (taesd_decoder.pth / taesdxl_decoder.safetensors, the "
                       "encoder is picked up beside it, or a diffusers AutoencoderTiny folder). 'synthetic': "
                       "random weights of the right architecture, to measure cost only (images are noise)")
    slicing: bool = option(False, "Decode a batch one image at a time: same images, lower peak memory; only "
                           "helps batches larger than 1, slightly slower")
    tiling: bool = option(False, "Decode (and encode) in overlapping tiles: lets very large images fit in "
                          "little memory; near-identical, faint seams are possible; slower")
