"""`bench stream`: frames per second and latency of the stream pipeline against a per-frame diffusers img2img loop.

Every row streams the same synthetic clip (a smooth pattern that moves, or stands still for the similarity
filter's static row) at the same size and steps on the same model, after warm-up frames (a stream fills its batch
and compiles there). Rows add one toggle at a time, so each one's contribution is the ratio to the row before it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..spec.errors import ConfigError
from ..stream.pipeline import percentile

_TINY = ("vae", {"variant": "tiny", "path": "synthetic"})
_CLIP_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "data" / "tokenizers" / "clip"


@dataclass(frozen=True)
class Variant:
    """A row: what it is, the stream settings it changes, the optimizations it adds, the row it is compared to."""

    description: str
    changes: dict | None = None  # None: not a stream (the diffusers loop)
    optimizations: tuple = ()
    against: str = ""


VARIANTS: dict[str, Variant] = {
    "diffusers-img2img": Variant("diffusers' StableDiffusionImg2ImgPipeline called per frame (prompt encoded, VAE "
                                 "encode and decode, the same UNet steps)"),
    "stream": Variant("SDAccel's stream frame by frame: prompt, noise and coefficients computed once",
                      {"stream_batch": False}, against="diffusers-img2img"),
    "stream-batch": Variant("+ Stream Batch: one UNet call advances every frame in flight", {}, against="stream"),
    "tiny-vae": Variant("+ Tiny VAE (TAESD architecture, random weights) encodes and decodes", {}, (_TINY,),
                        against="stream-batch"),
    "openvino": Variant("+ UNet compiled by OpenVINO", {}, (_TINY, ("compile", {"backend": "openvino"})),
                        against="tiny-vae"),
    "winograd": Variant("+ Winograd convolutions (instead of OpenVINO)", {}, (_TINY, ("winograd", {})),
                        against="tiny-vae"),
    "cfg-full": Variant("LCM, full CFG (a negative pass per step)", {"cfg_mode": "full"}),
    "rcfg-onetime": Variant("LCM, residual CFG with a onetime negative pass", {"cfg_mode": "onetime"},
                            against="cfg-full"),
    "rcfg-self": Variant("LCM, residual CFG with a self negative (no negative pass)", {"cfg_mode": "self"},
                         against="cfg-full"),
    "ssf-static": Variant("Tiny VAE + similarity filter on a still clip", {"similarity_filter": True}, (_TINY,),
                          against="tiny-vae"),
    "ssf-moving": Variant("Tiny VAE + similarity filter on a moving clip", {"similarity_filter": True}, (_TINY,),
                          against="tiny-vae"),
    "streamdiffusion": Variant("the streamdiffusion package (StreamDiffusion's own pipeline, Stream Batch, fp32) "
                               "on the same weights and clip, in its own venv (--streamdiffusion-python)"),
}
TURBO_VARIANTS = ("diffusers-img2img", "stream", "stream-batch", "tiny-vae", "openvino", "ssf-static", "ssf-moving")
LCM_VARIANTS = ("cfg-full", "rcfg-onetime", "rcfg-self")


@dataclass
class StreamBenchSettings:
    family: str = "sd-turbo"
    size: int = 512
    steps: int = 2
    strength: float = 0.5
    frames: int = 8
    warmup: int = 3
    variants: list = field(default_factory=lambda: list(TURBO_VARIANTS))
    checkpoint: str | None = None
    device: str = "cpu"
    prompt: str = "a watercolor painting of a harbour"
    streamdiffusion_python: str | None = None


def synthetic_clip(count: int, size: int, *, moving: bool = True, seed: int = 0):
    """[1, 3, size, size] frames: a smooth random pattern sliding sideways (or standing still)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=gen), size=(size, size),
                                           mode="bicubic", align_corners=False).clamp(0, 1)
    step = max(1, size // 64)
    return [torch.roll(base, shifts=i * step if moving else 0, dims=-1) for i in range(count)]


def _model(settings: StreamBenchSettings):
    from ..spec.model_ref import ModelRef

    if settings.checkpoint:
        return ModelRef(path=settings.checkpoint, family=settings.family)
    return ModelRef.synthetic(settings.family)


def row_settings(name: str, settings: StreamBenchSettings):
    """The StreamSettings a stream row runs (the example workflows hold the same values)."""
    from ..stream.settings import StreamSettings

    lcm = name in LCM_VARIANTS
    return StreamSettings(prompt=settings.prompt, negative_prompt="blurry" if lcm else "", width=settings.size,
                          height=settings.size, steps=settings.steps, strength=settings.strength, cfg_mode="none",
                          cfg=1.5 if lcm else 0.0, seed=0).with_(**VARIANTS[name].changes)


def _stream_row(name: str, settings: StreamBenchSettings, cache, say) -> dict:
    from ..spec.optimization import config_class
    from ..spec.pipeline import PipelineSpec
    from ..stream.pipeline import StreamPipeline

    variant = VARIANTS[name]
    spec = PipelineSpec(model=_model(settings), device=settings.device)
    for kind, fields in variant.optimizations:
        spec = spec.with_optimization(config_class(kind)(**fields))
    prepared = cache.prepare(spec, strict=True)
    stream_settings = row_settings(name, settings)
    clip = synthetic_clip(settings.warmup + settings.frames, settings.size, moving=name != "ssf-static")
    with StreamPipeline(prepared, stream_settings) as stream:
        for i, frame in enumerate(clip[:settings.warmup]):
            stream.push(frame, i)
        stream.stats.latencies_s.clear()
        calls_before, skipped_before = stream.stats.unet_calls, stream.stats.skipped
        start = time.perf_counter()
        out = 0
        for i, frame in enumerate(clip[settings.warmup:], start=settings.warmup):
            out += len(stream.push(frame, i))
        wall = time.perf_counter() - start
        latencies = sorted(stream.stats.latencies_s)
        skipped = stream.stats.skipped - skipped_before
        calls = stream.stats.unet_calls - calls_before
    say(f"[row ] {name}: {out} frames in {wall:.2f} s")
    return {"variant": name, "description": variant.description, "fps": round(out / wall, 4), "frames": out,
            "wall_s": round(wall, 3), "latency_p50_s": percentile(latencies, 0.5),
            "latency_p95_s": percentile(latencies, 0.95),
            "unet_calls": calls, "skipped": skipped, "skip_rate": round(skipped / settings.frames, 3),
            "guidance": stream.guidance, "scheduler": stream.kind}


def _diffusers_row(settings: StreamBenchSettings, cache, say) -> dict:
    """The per-frame loop users write with diffusers: its img2img pipeline over the same components, with the
    same UNet steps (`num_inference_steps = steps / strength`), no guidance."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    from ..models.schedulers import make_scheduler
    from ..spec.pipeline import PipelineSpec

    prepared = cache.prepare(PipelineSpec(model=_model(settings), device=settings.device), strict=True)
    pipe = prepared.pipe
    cls = StableDiffusionXLImg2ImgPipeline if prepared.family.is_xl else StableDiffusionImg2ImgPipeline
    img2img = cls.from_pipe(pipe, scheduler=make_scheduler("euler", prepared.loaded.scheduler_config, turbo=True))
    img2img.set_progress_bar_config(disable=True)
    total_steps = max(settings.steps, round(settings.steps / settings.strength))
    clip = synthetic_clip(settings.warmup + settings.frames, settings.size)
    import torch
    from PIL import Image

    def call(frame):
        image = Image.fromarray((frame[0].permute(1, 2, 0) * 255).round().byte().numpy())
        img2img(settings.prompt, image=image, num_inference_steps=total_steps, strength=settings.strength,
                guidance_scale=0.0, generator=torch.Generator().manual_seed(0))

    for frame in clip[:settings.warmup]:
        call(frame)
    times = []
    for frame in clip[settings.warmup:]:
        start = time.perf_counter()
        call(frame)
        times.append(time.perf_counter() - start)
    wall = sum(times)
    say(f"[row ] diffusers-img2img: {len(times)} frames in {wall:.2f} s")
    ordered = sorted(times)
    return {"variant": "diffusers-img2img", "description": VARIANTS["diffusers-img2img"].description,
            "fps": round(len(times) / wall, 4), "frames": len(times), "wall_s": round(wall, 3),
            "latency_p50_s": percentile(ordered, 0.5), "latency_p95_s": percentile(ordered, 0.95),
            "latency_spread_s": [round(ordered[0], 4), round(ordered[-1], 4)],
            "median_frame_s": round(statistics.median(times), 4), "unet_calls": None, "skipped": 0,
            "skip_rate": 0.0, "guidance": "none", "scheduler": f"euler trailing ({total_steps} of which "
                                                                f"{settings.steps} run)"}


def _streamdiffusion_row(settings: StreamBenchSettings, cache, say) -> dict:
    """The package's own pipeline over the same weights and clip, run by `peer_streamdiffusion_worker.py` under
    the Python that has it (it pins diffusers 0.24); its timesteps are the LCM indices nearest the stream's."""
    import json
    import shutil
    import subprocess
    import tempfile

    import torch

    from ..spec.pipeline import PipelineSpec
    from ..stream.schedule import stream_schedule

    python = settings.streamdiffusion_python
    if not python:
        raise ConfigError("--streamdiffusion-python", "no Python with the streamdiffusion package was given",
                          "pip install streamdiffusion into a venv of its own and pass its VENV/bin/python")
    prepared = cache.prepare(PipelineSpec(model=_model(settings), device="cpu"), strict=True)
    if prepared.family.is_xl:
        raise ConfigError("--family", "the streamdiffusion package runs SD 1.5 / SD-Turbo pipelines",
                          "use --family sd-turbo or sd15")
    schedule = stream_schedule(prepared.loaded.scheduler_config, steps=settings.steps, strength=settings.strength,
                               kind="turbo", device="cpu")
    t_index = [min(49, max(0, round((999 - int(t)) / 20))) for t in schedule.timesteps]
    folder = Path(tempfile.mkdtemp(prefix="sdaccel-streamdiffusion-"))
    try:
        prepared.pipe.save_pretrained(folder, safe_serialization=True)
        # current transformers writes only tokenizer.json, which the package's older tokenizers cannot read: the
        # CLIP BPE files SDAccel ships go beside it for the slow tokenizer the package's transformers loads
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(_CLIP_TOKENIZER / name, folder / "tokenizer" / name)
        torch.save(synthetic_clip(settings.warmup + settings.frames, settings.size), folder / "frames.pt")
        config = {"folder": str(folder), "size": settings.size, "prompt": settings.prompt, "warmup": settings.warmup,
                  "t_index_list": t_index, "threads": torch.get_num_threads()}
        (folder / "settings.json").write_text(json.dumps(config), encoding="utf-8")
        worker = Path(__file__).with_name("peer_streamdiffusion_worker.py")
        say(f"[peer] streamdiffusion ({python}), t_index_list {t_index} ...")
        done = subprocess.run([python, str(worker), str(folder / "settings.json")], capture_output=True, text=True,
                              timeout=3600)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError("streamdiffusion", f"the package failed on this machine: {last}",
                          "see the worker's error above")
    peer = json.loads(done.stdout.strip().splitlines()[-1])
    note = " (its CUDA-event timing calls replaced by wall-clock ones: no CUDA here)" \
        if peer["cuda_timing_replaced"] else ""
    return {"variant": "streamdiffusion", "description": VARIANTS["streamdiffusion"].description + note,
            "fps": round(peer["fps"], 4), "frames": peer["frames"], "wall_s": round(peer["wall_s"], 3),
            "latency_p50_s": round(peer["latency_p50_s"], 4), "latency_p95_s": round(peer["latency_p95_s"], 4),
            "latency_kind": "per call (the package returns the frame that entered steps-1 calls earlier)",
            "unet_calls": None, "skipped": 0, "skip_rate": 0.0, "guidance": "none",
            "scheduler": f"LCM t_index {peer['t_index_list']} (t = {peer['timesteps']})"}


def run_stream_bench(settings: StreamBenchSettings, *, cache=None, say=print) -> dict:
    from ..run.cache import PipelineCache
    from ..run.capabilities import machine_summary

    unknown = [v for v in settings.variants if v not in VARIANTS]
    if unknown:
        raise ConfigError("--variants", f"unknown stream variant {unknown[0]!r}", f"choose from: {', '.join(VARIANTS)}")
    cache = cache or PipelineCache(max_entries=1)
    rows = []
    for name in settings.variants:
        try:
            if name == "diffusers-img2img":
                row = _diffusers_row(settings, cache, say)
            elif name == "streamdiffusion":
                row = _streamdiffusion_row(settings, cache, say)
            else:
                row = _stream_row(name, settings, cache, say)
        except ConfigError as exc:
            say(f"[skip] {name}: {exc}")
            row = {"variant": name, "description": VARIANTS[name].description, "skipped_reason": str(exc)}
        rows.append(row)
    fps = {row["variant"]: row["fps"] for row in rows if "fps" in row}
    for row in rows:
        if "fps" not in row:
            continue
        base, against = fps.get("diffusers-img2img"), fps.get(VARIANTS[row["variant"]].against)
        row["speedup"] = round(row["fps"] / base, 3) if base else None
        row["against"] = VARIANTS[row["variant"]].against if against else None
        row["vs_reference"] = round(row["fps"] / against, 3) if against else None
    return {"machine": machine_summary(), "settings": {k: getattr(settings, k) for k in (
        "family", "size", "steps", "strength", "frames", "warmup", "variants", "checkpoint", "device", "prompt")},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}


def format_stream_table(report: dict) -> str:
    s = report["settings"]
    lines = [f"bench stream: {s['family']} {s['size']}x{s['size']}, {s['steps']} steps at strength {s['strength']}, "
             f"{s['frames']} frames after {s['warmup']} warm-up; {report['machine'].get('cpu')}",
             f"{'variant':<20} {'fps':>7} {'vs diffusers':>12} {'vs its ref':>10} {'ref':<16} {'p50 s':>7} "
             f"{'p95 s':>7} "
             f"{'skipped':>8}"]
    for row in report["rows"]:
        if "fps" not in row:
            lines.append(f"{row['variant']:<20} skipped: {row['skipped_reason']}")
            continue
        if row["skip_rate"] >= 1.0:  # every timed frame repeated the last image: no frame rate to compare
            lines.append(f"{row['variant']:<20} {'-':>7} {'-':>12} {'-':>10} {'-':<16} {'-':>7} {'-':>7} "
                         f"{row['skip_rate']:>8.0%}")
            continue
        lines.append(f"{row['variant']:<20} {row['fps']:>7.3f} {_x(row.get('speedup')):>12} "
                     f"{_x(row.get('vs_reference')):>10} {row.get('against') or '-':<16} "
                     f"{_s(row['latency_p50_s']):>7} {_s(row['latency_p95_s']):>7} "
                     f"{row['skip_rate']:>8.0%}")
    return "\n".join(lines)


def _x(value) -> str:
    return f"{value:.2f}x" if value else "-"


def _s(value) -> str:
    return f"{value:.3f}" if value is not None else "-"


__all__ = ["StreamBenchSettings", "run_stream_bench", "format_stream_table", "synthetic_clip", "VARIANTS"]
