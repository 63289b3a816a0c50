"""Winograd convolution settings: plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...spec.fields import option
from ...spec.optimization import OptimizationConfig, Stage, register_config

TILE_CHOICES = ("auto", "f2", "f4", "f6")
KERNEL_CHOICES = ("auto", "pytorch")


@register_config
@dataclass(frozen=True)
class WinogradConfig(OptimizationConfig):
    """Where Winograd may run and how its choice is made."""

    kind: ClassVar[str] = "winograd"
    stage: ClassVar[Stage] = Stage.CONV_KERNEL
    title: ClassVar[str] = "Winograd convolution"
    lossless: ClassVar[bool] = True
    unet: bool = option(True, "Use Winograd in the UNet's 3x3 convolutions (most of a CPU step)")
    vae: bool = option(True, "Use Winograd in the VAE's 3x3 convolutions: the whole SD1.5 decode at 512x512 "
                       "measured 1.39x on a 2-core CPU with the compiled transforms (the eager ones lose on the "
                       "VAE's large maps, and the calibration then keeps most of its layers on F.conv2d)")
    tile: str = option("auto", "auto: per convolution shape, measure F.conv2d, F(2,3), F(4,3) and (with the compiled "
                       "transforms) F(6,3) once on this machine and keep the fastest (never slower than "
                       "F.conv2d). f2/f4/f6 force one tile everywhere (f6: fewest multiplications, largest "
                       "rounding error, 7x the layer's weight in transformed filters)", choices=TILE_CHOICES)
    fused_transforms: bool = option(True, "PyTorch Winograd only: run the input and output transforms as compiled "
                                    "loops (torch.compile's "
                                    "C++ backend): about 4x faster transforms, which is what makes the VAE's large "
                                    "layers and F(6,3) pay. Needs a C++ compiler and costs a one-time compile (about "
                                    "20-30 s per tile size and memory layout, kept in inductor's disk cache); without "
                                    "one the eager PyTorch transforms run")
    filter_cache_mb: int = option(0, "Memory for transformed filters kept between calls (F(6,3) filters take 7.1x "
                                  "the layer's weight, F(4,3) 4x, F(2,3) 1.8x). Native kernel: every layer runs "
                                  "without (its filters transformed inside the call); after the first run the "
                                  "budget goes to the layers where keeping them saves the most time per MB. 0 = "
                                  "auto: at most 1 GiB, 10% of RAM and 25% of the memory left once the model is "
                                  "loaded. PyTorch Winograd: a layer whose best tile finds no room takes the next "
                                  "fastest, or stays on F.conv2d; 0 = auto: 30% of RAM, at most 8 GiB and 40% of what "
                                  "is left (SD1.5's UNet and VAE at 512x512 took 7.2 GiB)", min=0, max=262144,
                                  step=64)
    calibration_dir: str = option("", "Folder for the per-machine calibration file (empty: ~/.cache/sdaccel, or "
                                  "$SDACCEL_CACHE_DIR)")
    kernel: str = option("auto", "auto: SDAccel's native Winograd kernel (input transform, products and output "
                         "transform fused per block of tiles, filters transformed inside the call unless the filter "
                         "budget keeps them), compiled once for this CPU in the background (about 2 minutes on 2 "
                         "cores, needs a C++ compiler and ninja; kept in the SDAccel cache folder; runs until then "
                         "use F.conv2d and say so, the next run picks it up); where it cannot be built, the "
                         "PyTorch Winograd (see fused_transforms). pytorch: always the PyTorch Winograd",
                         choices=KERNEL_CHOICES, late=True)
