"""`python -m sdaccel stream`: img2img over a video or a folder of frames, or a txt2img stream, with a live readout.

Frames out go to a folder of PNGs or a video file. The bar shows frames done (of the total when known), frames per
second and the latency of the last frame; Ctrl+C stops cleanly (the frames written stay whole, the summary prints).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..spec.errors import ConfigError
from .settings import StreamSettings


def add_stream_parser(sub) -> None:
    from ..cli import add_config_arguments
    from ..spec.model_ref import ModelRef

    parser = sub.add_parser("stream", help="real-time img2img over a video or image folder, or a txt2img stream")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file, diffusers folder, or synthetic:<family>")
    add_config_arguments(parser, ModelRef, skip=("path",))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--input", default=None, help="a video file or a folder of images (omit for txt2img)")
    parser.add_argument("--frames", type=int, default=None, help="txt2img: how many frames to make")
    parser.add_argument("--output", required=True, help="a folder (PNG frames) or a video file (.mp4, .gif, ...)")
    parser.add_argument("--fps", type=float, default=24.0, help="frame rate of a video output")
    parser.add_argument("--opt", action="append", default=[], metavar="KIND[:FIELD=VALUE,...]",
                        help="add an optimization (e.g. vae:variant=tiny,path=taesd.safetensors; compile:backend="
                        "openvino; winograd)")
    parser.add_argument("--preset", action="append", default=[], help="add a bench preset's optimizations")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="merge a LoRA (an LCM-LoRA for SD 1.5 / SDXL streams)")
    add_config_arguments(parser, StreamSettings)


def _settings(args) -> StreamSettings:
    from ..cli import config_from_args

    return config_from_args(StreamSettings, args)


def _source(args, settings: StreamSettings):
    """(source of (i, item), total frames or None)."""
    from .frames import VIDEO_SUFFIXES, frame_source

    if args.input is None:
        if settings.strength < 1.0:
            raise ConfigError("--input", "img2img needs frames", "give --input, or --strength 1 --frames N for "
                              "txt2img")
        if not args.frames or args.frames < 1:
            raise ConfigError("--frames", "a txt2img stream needs a frame count", "add --frames N")
        return ((i, None) for i in range(args.frames)), args.frames
    if args.frames is not None:
        raise ConfigError("--frames", "applies to txt2img only", "drop it; every input frame is used")
    if settings.txt2img:
        raise ConfigError("--strength", "1.0 ignores the input frames (txt2img)", "use a strength below 1")
    path = Path(args.input).expanduser()
    source = frame_source(path)
    if path.is_dir():
        source = list(source)
        return source, len(source)
    return source, _video_length(path) if path.suffix.lower() in VIDEO_SUFFIXES else None


def _video_length(path) -> int | None:
    try:
        import av

        with av.open(str(path)) as container:
            return container.streams.video[0].frames or None
    except Exception:  # the count is only for the bar
        return None


def _sink(output: str):
    from .frames import VIDEO_SUFFIXES, FolderSink, VideoSink

    path = Path(output).expanduser()
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return VideoSink(path)
    if path.exists() and not path.is_dir():
        raise ConfigError("--output", f"{path} is a file", "name a folder or a video file (.mp4, .gif, ...)")
    return FolderSink(path)


def cmd_stream(args) -> int:
    from tqdm import tqdm

    from ..bench.presets import resolve_preset
    from ..cli import config_from_args, parse_opt
    from ..run.cache import default_cache
    from ..spec.lora import LoraRef
    from ..spec.model_ref import ModelRef
    from ..spec.pipeline import GenerationRequest, PipelineSpec
    from .frames import VideoSink, load_frame
    from .pipeline import StreamPipeline
    from .queues import FrameError, StreamRunner

    settings = _settings(args)
    source, total = _source(args, settings)
    model = config_from_args(ModelRef, args, path=args.checkpoint)
    spec = PipelineSpec(model=model, device=args.device, loras=tuple(LoraRef.parse(text) for text in args.lora))
    request = GenerationRequest()
    for name in args.preset:
        spec, request = resolve_preset(name).apply(spec, request)
    for text in args.opt:
        spec = spec.with_optimization(parse_opt(text))
    sink = _sink(args.output)
    if isinstance(sink, VideoSink):
        sink.fps = args.fps
    prepared = default_cache().prepare(spec)
    stream = StreamPipeline(prepared, settings)
    bar = tqdm(total=total, desc="stream", unit="frame")
    started = time.perf_counter()

    def write(item) -> None:
        if isinstance(item, FrameError):
            bar.write(f"frame {item.frame} ({item.source}) skipped: {item.message}", file=sys.stderr)
            return
        sink(item)
        done = bar.n + 1
        bar.set_postfix_str(f"{done / (time.perf_counter() - started):.2f} fps, latency {item.latency_s:.2f} s"
                            + (" (repeated)" if item.skipped else ""), refresh=False)
        bar.update(1)

    def load(item):
        return None if item is None else load_frame(item, settings.width, settings.height, settings.resize)

    runner = StreamRunner(stream, source, load, write, queue_size=settings.queue_size, policy=settings.queue_policy)
    try:
        summary = runner.run()
    finally:
        bar.close()
        sink.close()
    print("; ".join(stream.describe(summary)))
    return 130 if summary["interrupted"] else 0


__all__ = ["add_stream_parser", "cmd_stream"]
