"""SDAccelStream: an IMAGE batch (a video's frames from a core or common video loader) through the stream pipeline.

The frames go through the engine's StreamPipeline in order (Stream Batch, residual CFG, the similarity filter, with
the pipe's optimizations: Tiny VAE, compile, Winograd), one image out per frame in frame order. Progress is per
frame; an interrupt stops before the next frame. The statistics (frames per second, latency, skipped frames) go to
the STRING output and the node's badge.
"""

from __future__ import annotations

import logging

from ..optim.spec.ensemble import EnsembleSpec
from ..optim.spec.errors import ConfigError, GenerationInterrupted
from ..optim.stream.settings import StreamSettings
from . import host
from .generation import STATS_KEY, engine_cache
from .inputs import ui_fields, values, widget
from .pipe import PIPE, PIPE_TOOLTIP

log = logging.getLogger(__name__)

# the batch is already in memory: no reader/writer threads, and its size is the frames' own
_NOT_INPUTS = ("width", "height", "queue_size", "queue_policy", "resize")


class SDAccelStream:
    """Real-time img2img (StreamDiffusion's techniques) over a batch of frames."""

    CATEGORY = "sdaccel/sampling"
    DESCRIPTION = ("Stream a batch of frames (e.g. a loaded video) through SDAccel's stream pipeline: every frame "
                   "takes the same few steps; Stream Batch runs the frames in flight as one UNet batch, residual CFG "
                   "guides without a negative pass, the similarity filter skips near-identical frames. Use a Turbo "
                   "checkpoint, or SD 1.5 / SDXL with an LCM-LoRA (SDAccel LoRA node).")
    FUNCTION = "stream"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "stats")
    OUTPUT_TOOLTIPS = ("One image per input frame, in frame order ([frames, height, width, 3])",
                       "Frames per second, latency p50/p95, frames skipped by the similarity filter")

    @classmethod
    def fields(cls):
        return ui_fields(StreamSettings, skip=_NOT_INPUTS)

    @classmethod
    def INPUT_TYPES(cls):
        required = {"pipe": (PIPE, {"tooltip": PIPE_TOOLTIP}),
                    "images": ("IMAGE", {"tooltip": "The frames, [frames, height, width, 3]; their size (rounded "
                                         "down to a multiple of 8) is the stream's"})}
        required.update({info.name: widget(info) for info in cls.fields()})
        return {"required": required}

    def stream(self, pipe, images, **given):
        import torch

        from ..optim.stream.pipeline import StreamPipeline

        spec = pipe.spec
        if isinstance(spec, EnsembleSpec):
            raise ConfigError("pipe", "a stream runs one model, not the SDXL refiner ensemble",
                              "connect the pipe before the Refiner Ensemble node")
        if images.dim() != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
            raise ConfigError("images", f"expected frames [frames, height, width, 3], got {tuple(images.shape)}",
                              "connect an IMAGE batch (a video loader's frames)")
        height, width = int(images.shape[1]) // 8 * 8, int(images.shape[2]) // 8 * 8
        settings = StreamSettings(width=width, height=height, **values(self.fields(), given))
        progress, should_interrupt = host.progress_callback(), host.interrupt_check()
        frames = images[:, :height, :width].permute(0, 3, 1, 2).float().clamp(0, 1)
        outputs = {}
        cache = engine_cache()
        try:
            with cache.use(spec) as prepared, StreamPipeline(prepared, settings) as stream:
                for i in range(frames.shape[0]):
                    if should_interrupt is not None and should_interrupt():
                        raise GenerationInterrupted(i, frames.shape[0])
                    for out in stream.push(frames[i:i + 1], i):
                        outputs[out.frame] = out.image
                    if progress is not None:
                        progress(len(outputs), frames.shape[0])
                for out in stream.flush():
                    outputs[out.frame] = out.image
        except GenerationInterrupted as exc:
            log.info("SDAccel stream: %s", exc)
            host.raise_interrupted(exc)
        finally:
            host.BRIDGE.sync(cache, [entry for entry in cache.entries() if entry.spec == spec])
        summary = stream.stats.summary()
        lines = stream.describe(summary)
        result = torch.stack([outputs[i] for i in range(frames.shape[0])])
        stats = {"lines": lines, "summary": lines[0], "stream": summary, "spec": spec.to_dict(),
                 "settings": settings.to_dict()}  # what ran, so a workflow can be checked against its bench row
        return {"ui": {STATS_KEY: [stats]},
                "result": (result, "\n".join(lines))}


__all__ = ["SDAccelStream"]
