"""A stream's settings (plain data, described once for the CLI, the ComfyUI node and the web UI)."""

from __future__ import annotations

from dataclasses import dataclass

from ..spec.errors import ConfigError
from ..spec.fields import Config, option
from .guidance import CFG_MODES

QUEUE_POLICIES = ("block", "drop_oldest")
RESIZE_POLICIES = ("fit", "strict")


@dataclass(frozen=True)
class StreamSettings(Config):
    """What a stream draws and how: prompt, size, the few steps every frame takes, guidance, and the toggles."""

    prompt: str = option("", "What every frame should become", multiline=True)
    negative_prompt: str = option("", "What to keep out (full and onetime guidance only)", multiline=True)
    width: int = option(512, "Frame width in pixels, a multiple of 8", min=64, max=2048, step=8)
    height: int = option(512, "Frame height in pixels, a multiple of 8", min=64, max=2048, step=8)
    steps: int = option(2, "Denoising steps per frame (1-4 for Turbo and LCM models)", min=1, max=50)
    strength: float = option(0.5, "img2img: how far each frame moves from its source (1.0: txt2img, pure noise)",
                             min=0.01, max=1.0, step=0.01)
    scheduler: str = option("auto", "Stream sampler: lcm (LCM-LoRA / LCM models), turbo (SD-Turbo, SDXL-Turbo: "
                            "x0 predicted outright); auto picks turbo for Turbo families, else lcm",
                            choices=("auto", "lcm", "turbo"))
    cfg_mode: str = option("self", "Guidance: none; full (a negative UNet pass per step, twice the work); self "
                           "(residual CFG: the input frame stands in for the negative, no extra pass); onetime "
                           "(one negative pass at each frame's first step)", choices=CFG_MODES)
    cfg: float = option(1.4, "Guidance scale (ignored with cfg_mode none; Turbo models want none)", min=0.0,
                        max=30.0, step=0.1)
    delta: float = option(1.0, "Residual CFG: the virtual negative noise's weight (1 = plain CFG's formula)",
                          min=0.0, max=2.0, step=0.05)
    stream_batch: bool = option(True, "Stream Batch: one UNet call advances every frame in flight by one step "
                                "(latency: a frame leaves `steps` frames later); off: each frame's steps run one "
                                "after another")
    similarity_filter: bool = option(False, "Skip frames nearly identical to the last processed one (the last "
                                     "output is repeated)")
    similarity_threshold: float = option(0.98, "Similarity filter: cosine similarity above which frames may be "
                                         "skipped (skip chance grows to 1 for an identical frame)", min=0.0,
                                         max=1.0, step=0.005)
    max_skip: int = option(10, "Similarity filter: process a frame after this many skips in a row", min=0,
                           max=1000)
    seed: int = option(0, "Seed of the stream's fixed per-step noise (and of txt2img frames: seed + frame)",
                       min=0, max=2**63 - 1)
    queue_size: int = option(4, "Frames waiting in each of the input and output queues", min=1, max=256)
    queue_policy: str = option("block", "A full input queue: block the reader (files: no frame lost) or drop the "
                               "oldest waiting frame (cameras: stay live; counted)", choices=QUEUE_POLICIES)
    resize: str = option("fit", "A frame of another size: fit (resize it to the stream size) or strict (refuse it "
                         "with an error; the stream goes on)", choices=RESIZE_POLICIES)

    def __post_init__(self):
        super().__post_init__()
        for name in ("width", "height"):
            if getattr(self, name) % 8:
                raise ConfigError(f"StreamSettings.{name}", f"{getattr(self, name)} is not a multiple of 8",
                                  f"use {getattr(self, name) // 8 * 8}")

    @property
    def txt2img(self) -> bool:
        return self.strength >= 1.0


__all__ = ["StreamSettings", "QUEUE_POLICIES", "RESIZE_POLICIES"]
