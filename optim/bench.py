"""`bench`: compare presets side by side in one process on the user's own machine.

Each preset is prepared once (load/apply time reported apart), warmed up, then run `repeats`
times; the table reports median, min and max end-to-end time, speedup against the first row, peak
memory and per-stage medians. Without a checkpoint the real architecture is built with random
weights: a convolution costs the same whatever its weights.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .capabilities import machine_summary, resolve_device
from .errors import SDAccelError
from .models import ModelRef
from .presets import resolve_preset
from .sampler import run
from .session import PipelineCache
from .spec import GenerationRequest, PipelineSpec

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse, detailed, sharp focus"


@dataclass
class BenchSettings:
    family: str = "sd15"
    size: int = 512
    steps: int = 20
    presets: list = field(default_factory=lambda: ["baseline"])
    repeats: int = 3
    warmup: int = 1
    checkpoint: str | None = None
    device: str = "auto"
    batch_size: int = 1
    seed: int = 0
    cfg: float | None = None
    scheduler: str = "auto"
    prompt: str = DEFAULT_PROMPT


def _row_for(preset_name: str, results: list, prepare_s: float) -> dict:
    times = [r.stats.total_s for r in results]
    stages: dict[str, float] = {}
    for key in results[0].stats.stage_s:
        stages[key] = round(statistics.median(r.stats.stage_s.get(key, 0.0) for r in results), 4)
    stage_mem: dict[str, float] = {}
    for r in results:
        for key, value in r.stats.stage_peak_mem_mb.items():
            stage_mem[key] = max(stage_mem.get(key, 0.0), value)
    last = results[-1].stats
    return {"preset": preset_name, "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4), "speedup": None, "peak_mem_mb": round(max(r.stats.peak_mem_mb
                                                                                     for r in results), 1),
            "stage_median_s": stages, "stage_peak_mem_mb": stage_mem, "unet_calls": last.unet_calls,
            "it_per_s": round(statistics.median(r.stats.it_per_s for r in results), 3),
            "prepare_s": round(prepare_s, 2), "repeats": len(results), "runs_s": [round(t, 4) for t in times],
            "optimizations": last.optimizations, "dtypes": last.dtypes, "mem_kind": last.mem_kind}


def run_bench(settings: BenchSettings, *, cache: PipelineCache | None = None,
              say: Callable[[str], None] = print) -> dict:
    """Run every preset of `settings`; return {"machine", "settings", "rows"} (rows in given order)."""
    cache = cache if cache is not None else PipelineCache(max_entries=1)
    if settings.checkpoint:
        model = ModelRef(path=settings.checkpoint, family=settings.family or "auto")
    else:
        model = ModelRef.synthetic(settings.family)
    base_spec = PipelineSpec(model=model, device=settings.device)
    base_request = GenerationRequest(prompt=settings.prompt, width=settings.size, height=settings.size,
                                     steps=settings.steps, seed=settings.seed, cfg=settings.cfg,
                                     batch_size=settings.batch_size, scheduler=settings.scheduler)
    device = resolve_device(settings.device)
    rows: list[dict] = []
    for name in settings.presets:
        preset = resolve_preset(name)
        spec, request = preset.apply(base_spec, base_request)
        prepared = cache.prepare(base_spec)  # loads the model once; presets reconfigure it in memory
        reason = preset.unavailable_reason(spec, device, prepared.family)
        if reason:
            say(f"[skip] {name}: {reason}")
            rows.append({"preset": name, "skipped": reason})
            continue
        say(f"[run ] {name}: {preset.description}")
        start = time.perf_counter()
        try:
            cache.prepare(spec, strict=True)  # never fake a configuration this machine lacks
        except SDAccelError as exc:
            say(f"[skip] {name}: {exc}")
            rows.append({"preset": name, "skipped": str(exc)})
            continue
        prepare_s = time.perf_counter() - start
        for _ in range(settings.warmup):
            run(spec, request, cache=cache, strict=True)
        results = []
        for i in range(settings.repeats):
            result = run(spec, request, cache=cache, strict=True)
            results.append(result)
            say(f"       run {i + 1}/{settings.repeats}: {result.stats.total_s:.2f}s")
        rows.append(_row_for(name, results, prepare_s))
    timed = [r for r in rows if "median_s" in r]
    if timed:
        ref = timed[0]["median_s"]
        for r in timed:
            r["speedup"] = round(ref / r["median_s"], 3) if r["median_s"] else None
    return {"machine": machine_summary(), "device": str(device),
            "settings": {k: v for k, v in settings.__dict__.items()}, "model": model.to_dict(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}


def format_table(report: dict) -> str:
    """A fixed-width table of the rows, speedups against the first timed row."""
    header = f"{'preset':<28} {'median s':>9} {'min s':>8} {'max s':>8} {'speedup':>8} {'peak MB':>9} " \
             f"{'it/s':>7} {'unet':>5}"
    lines = [header, "-" * len(header)]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"{r['preset']:<28} skipped: {r['skipped'][:90]}")
            continue
        lines.append(f"{r['preset']:<28} {r['median_s']:>9.3f} {r['min_s']:>8.3f} {r['max_s']:>8.3f} "
                     f"{(r['speedup'] or 0):>7.2f}x {r['peak_mem_mb']:>9.0f} {r['it_per_s']:>7.2f} "
                     f"{r['unet_calls']:>5}")
    s = report["settings"]
    m = report["machine"]
    lines.append(f"{s['family']} {s['size']}x{s['size']} {s['steps']} steps batch {s['batch_size']}, "
                 f"{s['repeats']} repeats after {s['warmup']} warm-up; {report['device']}: {m.get('cpu')} "
                 f"({m.get('torch_threads')} threads), torch {m.get('torch')}")
    return "\n".join(lines)


def write_json(report: dict, path) -> Path:
    """Write atomically: a crash never leaves a half-written report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)
    return path
