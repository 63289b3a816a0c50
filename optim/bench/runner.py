"""`bench`: compare presets side by side in one process on the user's own machine.

Each preset is prepared once (load/apply time reported apart), warmed up, then run `repeats`
times; the table reports median, min and max end-to-end time, speedup against the first row, peak
memory and per-stage medians. Without a checkpoint the real architecture is built with random
weights: a convolution costs the same whatever its weights.
"""

from __future__ import annotations

import gc
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..run.allocator import release_free_memory
from ..run.cache import PipelineCache
from ..run.capabilities import machine_summary, resolve_device
from ..run.files import atomic_path
from ..run.sampler import run
from ..spec.errors import ConfigError, SDAccelError
from ..spec.model_ref import ModelRef
from ..spec.pipeline import GenerationRequest, PipelineSpec
from ..testing import enable_synthetic
from .metrics import psnr_db, ssim
from .presets import resolve_preset
from .roofline import machine_peaks, model_flops, roofline_columns

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse, detailed, sharp focus"


@dataclass
class BenchSettings:
    family: str | None = None  # random weights: this family (default sd15); a checkpoint: an override
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
    refiner: str | None = None  # refiner checkpoint for the ensemble preset (random weights when absent)
    optimum: bool = False  # add optimum-intel's OpenVINO pipeline on the same weights (optim/bench/peer_optimum.py)
    optimum_python: str | None = None  # the Python that has optimum-intel (default: this one)
    reference_file: str | None = None  # fidelity against the baseline images another bench process saved
    save_reference_file: str | None = None  # where the baseline row keeps its images for such processes


def _row_for(preset_name: str, results: list, prepare_s: float, warmups: list) -> dict:
    times = [r.stats.total_s for r in results]
    stages: dict[str, float] = {}
    for key in results[0].stats.stage_s:
        stages[key] = round(statistics.median(r.stats.stage_s.get(key, 0.0) for r in results), 4)
    stage_mem: dict[str, float] = {}
    for r in results:
        for key, value in r.stats.stage_peak_mem_mb.items():
            stage_mem[key] = max(stage_mem.get(key, 0.0), value)
    last = results[-1].stats
    # Compilers work lazily on the first call: their time is reported apart from the run times.
    compile_s = sum(float(r.stats.counters.get("compile_s", 0.0)) for r in warmups + results)
    return {"preset": preset_name, "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4), "speedup": None, "peak_mem_mb": round(max(r.stats.peak_mem_mb
                                                                                     for r in results), 1),
            "psnr_db": None, "ssim": None, "unet_calls": last.unet_calls,
            "compile_s": round(compile_s, 2) if compile_s else 0.0,
            "stage_median_s": stages, "stage_peak_mem_mb": stage_mem,
            "it_per_s": round(statistics.median(r.stats.it_per_s for r in results), 3),
            "prepare_s": round(prepare_s, 2), "warmup_s": [round(w.stats.total_s, 3) for w in warmups],
            "repeats": len(results), "runs_s": [round(t, 4) for t in times], "steps": last.steps,
            "optimizations": last.optimizations, "dtypes": last.dtypes, "mem_kind": last.mem_kind,
            "notes": last.notes, "counters": last.counters}


def _roofline_inputs(pipe, size: int, say) -> tuple[dict, dict]:
    """(FLOPs of one UNet sample and one VAE decode, this machine's fp32/bf16 peaks); empty where not countable."""
    try:
        flops = model_flops(pipe, size)
        peaks = machine_peaks() if next(pipe.unet.parameters()).device.type == "cpu" else {}
    except Exception as exc:  # noqa: BLE001 - the column is an extra: a model the counter cannot take just lacks it
        say(f"[note] no roofline column: {type(exc).__name__}: {exc}")
        return {}, {}
    return flops, peaks


def _run_preset(preset, spec, request, cache, refiner_spec, *, strict=True):
    if preset.runner == "ensemble":
        from ..run.ensemble import run_ensemble
        from ..spec.ensemble import EnsembleSpec

        return run_ensemble(EnsembleSpec(base=spec, refiner=refiner_spec), request, cache=cache, strict=strict)
    return run(spec, request, cache=cache, strict=strict)


def _fidelity(row: dict, images, reference) -> None:
    if reference is None or images.shape != reference.shape:
        return
    row["psnr_db"] = round(psnr_db(images, reference), 2) if psnr_db(images, reference) != float("inf") else None
    row["ssim"] = round(ssim(images, reference), 4)
    if row["psnr_db"] is None:
        row["identical_to_baseline"] = True


def save_reference(images, path) -> None:
    """The baseline images as a safetensors file (complete or absent): other processes' fidelity reference."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"images": images.contiguous()}, str(tmp))


def load_reference(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))["images"]
    except (OSError, SafetensorError, KeyError) as exc:
        raise ConfigError("--reference", f"{path} holds no reference images ({exc})",
                          "give the file a baseline bench run wrote with --save-reference") from exc


def run_bench(settings: BenchSettings, *, cache: PipelineCache | None = None,
              say: Callable[[str], None] = print) -> dict:
    """Run every preset of `settings`; return {"machine", "settings", "rows"} (rows in given order).

    Each timed row carries `psnr_db`/`ssim` of its image against the baseline image of the same seed
    (null for the baseline itself; the baseline is rendered once untimed when it is not in the list).
    The `bench` command tells glibc to keep freed memory in its own process first (otherwise page-fault costs
    drift with the process's history and identical rows differ by up to 30%, see allocator.py); inside a host
    (the A1111/Forge tab's Bench, ComfyUI's bench node) the host's allocator is left as the host set it.
    """
    enable_synthetic()  # the random-weight models are what a bench without --checkpoint measures
    for name, value, low in (("repeats", settings.repeats, 1), ("warmup", settings.warmup, 0),
                             ("size", settings.size, 64), ("steps", settings.steps, 1)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"bench --{name}", f"{value!r} is below {low}", f"use --{name} {max(low, 1)} or more")
    cache = cache if cache is not None else PipelineCache(max_entries=2)
    if settings.checkpoint:
        model = ModelRef(path=settings.checkpoint, family=settings.family or "auto")
    else:
        model = ModelRef.synthetic(settings.family or "sd15")
    base_spec = PipelineSpec(model=model, device=settings.device)
    base_request = GenerationRequest(prompt=settings.prompt, width=settings.size, height=settings.size,
                                     steps=settings.steps, seed=settings.seed, cfg=settings.cfg,
                                     batch_size=settings.batch_size, scheduler=settings.scheduler)
    refiner_model = ModelRef(path=settings.refiner) if settings.refiner else ModelRef.synthetic("sdxl-refiner")
    device = resolve_device(settings.device)
    rows: list[dict] = []
    reference = load_reference(settings.reference_file) if settings.reference_file else None
    roofline = None  # (model FLOPs, machine peaks), taken at the first timed row
    prepared_family = None
    for name in settings.presets:
        preset = resolve_preset(name)
        spec, request = preset.apply(base_spec, base_request)
        prepared = cache.prepare(base_spec, strict=True)  # loads the model once; presets reconfigure it in memory
        prepared_family = prepared.family.name
        if reference is None and name != "baseline":
            say("[ref ] baseline image for the fidelity columns (untimed)")
            reference = run(base_spec, base_request, cache=cache, strict=True).images_tensor
        reason = preset.unavailable_reason(spec, device, prepared.family)
        if reason:
            say(f"[skip] {name}: {reason}")
            rows.append({"preset": name, "skipped": reason})
            continue
        say(f"[run ] {name}: {preset.description}")
        gc.collect()
        release_free_memory()  # this row's peak memory is its own, not what earlier rows left in the heap
        refiner_spec = PipelineSpec(model=refiner_model, device=settings.device, optimizations=spec.optimizations)
        start = time.perf_counter()
        try:
            cache.prepare(spec, strict=True)  # never fake a configuration this machine lacks
            if preset.runner == "ensemble":
                cache.prepare(refiner_spec, strict=True)
        except SDAccelError as exc:
            say(f"[skip] {name}: {exc}")
            rows.append({"preset": name, "skipped": str(exc)})
            continue
        prepare_s = time.perf_counter() - start
        warmups = [_run_preset(preset, spec, request, cache, refiner_spec) for _ in range(settings.warmup)]
        results = []
        for i in range(settings.repeats):
            result = _run_preset(preset, spec, request, cache, refiner_spec)
            results.append(result)
            say(f"       run {i + 1}/{settings.repeats}: {result.stats.total_s:.2f}s")
        row = _row_for(name, results, prepare_s, warmups)
        if roofline is None:
            roofline = _roofline_inputs(cache.prepare(base_spec, strict=True).pipe, settings.size, say)
        if roofline[0]:
            row["roofline"] = roofline_columns(row, [r.stats for r in results], *roofline)
        if name == "baseline":
            reference = results[-1].images_tensor
            if settings.save_reference_file:
                save_reference(reference, settings.save_reference_file)
        else:
            _fidelity(row, results[-1].images_tensor, reference)
        rows.append(row)
    if settings.optimum:
        from ..run.sampler import _plan
        from .peer_optimum import run_optimum_rows

        prepared = cache.prepare(base_spec, strict=True)
        if reference is None:
            say("[ref ] baseline image for the fidelity columns (untimed)")
            reference = run(base_spec, base_request, cache=cache, strict=True).images_tensor
        rows.extend(run_optimum_rows(prepared, _plan(base_request, prepared.family), settings, reference,
                                     python=settings.optimum_python, say=say))
    set_speedups(rows)
    if roofline and roofline[1]:
        machine = {**machine_summary(), "peaks": roofline[1], "model_flops": roofline[0]}
    else:
        machine = machine_summary()
    return {"machine": machine, "device": str(device),
            "settings": {**settings.__dict__, "family": prepared_family or settings.family},
            "model": model.to_dict(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}


def set_speedups(rows: list[dict]) -> None:
    """Each timed row's speedup against the first timed row (skipped rows have none)."""
    timed = [r for r in rows if "median_s" in r]
    for r in timed:
        r["speedup"] = round(timed[0]["median_s"] / r["median_s"], 3) if r["median_s"] else None


def format_table(report: dict) -> str:
    """A fixed-width table of the rows, speedups against the first timed row."""
    header = (f"{'preset':<26} {'median s':>9} {'min s':>8} {'max s':>8} {'speedup':>8} {'peak MB':>8} "
              f"{'PSNR dB':>8} {'SSIM':>6} {'unet':>5} {'compile s':>9} {'UNet GF/s':>9} {'VAE GF/s':>9}")
    lines = [header, "-" * len(header)]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"{r['preset']:<26} skipped: {r['skipped'][:110]}")
            continue
        psnr = "same" if r.get("identical_to_baseline") else ("-" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}")
        ssim_text = "-" if r["ssim"] is None else f"{r['ssim']:.3f}"
        lines.append(f"{r['preset']:<26} {r['median_s']:>9.3f} {r['min_s']:>8.3f} {r['max_s']:>8.3f} "
                     f"{(r['speedup'] or 0):>7.2f}x {r['peak_mem_mb']:>8.0f} {psnr:>8} {ssim_text:>6} "
                     f"{r['unet_calls']:>5} {r['compile_s']:>9.1f} {_rate(r, 'unet'):>9} {_rate(r, 'vae'):>9}")
    s = report["settings"]
    m = report["machine"]
    if m.get("peaks"):
        peaks = ", ".join(f"{k} {v['peak_gflops']:.0f}" for k, v in m["peaks"].items())
        lines.append(f"GF/s: effective GFLOP/s (the full models' work over the stage's time: a row that skips work can "
                     f"beat the peak); this machine's peaks (GFLOP/s): {peaks}; one UNet sample "
                     f"{m['model_flops']['unet_sample'] / 1e9:.0f} GFLOP, one VAE decode "
                     f"{m['model_flops']['vae_decode'] / 1e9:.0f} GFLOP")
    lines.append(f"{s['family']} {s['size']}x{s['size']} {s['steps']} steps batch {s['batch_size']}, "
                 f"{s['repeats']} repeats after {s['warmup']} warm-up; {report['device']}: {m.get('cpu')} "
                 f"({m.get('torch_threads')} threads), torch {m.get('torch')}. Time = text encode + denoise + "
                 f"decode; PSNR/SSIM against the baseline image of the same seed")
    return "\n".join(lines)


def _rate(row: dict, part: str) -> str:
    entry = row.get("roofline", {}).get(part)
    return "-" if entry is None else f"{entry['gflops']:.0f}"


def write_chart(report: dict, path) -> Path:
    """Speedup and peak-memory bars per preset (matplotlib), written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SDAccelError("bench --chart needs matplotlib: pip install matplotlib") from exc
    rows = [r for r in report["rows"] if "median_s" in r]
    if not rows:
        raise SDAccelError("bench --chart: no preset ran, nothing to draw")
    names = [r["preset"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.35 * len(rows) + 1.5)), sharey=True)
    ax1.barh(names, [r["speedup"] or 0 for r in rows], color="#3b7dd8")
    ax1.axvline(1.0, color="black", linewidth=0.8)
    ax1.set_xlabel("speedup vs first row (x)")
    ax2.barh(names, [r["peak_mem_mb"] for r in rows], color="#d8833b")
    ax2.set_xlabel(f"peak memory (MB, {rows[0].get('mem_kind', '')})")
    ax1.invert_yaxis()
    s = report["settings"]
    fig.suptitle(f"SDAccel bench: {s['family']} {s['size']}x{s['size']}, {s['steps']} steps, {report['device']}")
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure atomically (a crash leaves no half-written PNG) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def write_json(report: dict, path) -> Path:
    """Write atomically: a crash never leaves a half-written report."""
    path = Path(path)
    text = json.dumps(report, indent=2, default=str)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def table_path(json_path) -> Path:
    """Where a report's printed table is kept: beside its JSON, same stem, `.md` (never the JSON itself)."""
    path = Path(json_path)
    return path.with_name(path.name + ".table.md") if path.suffix == ".md" else path.with_suffix(".md")


def write_table(table: str, json_path, title: str) -> Path:
    """The table a bench printed, as Markdown beside its JSON report (written atomically). The table keeps its
    fixed-width columns in a text block, so the file reads as the console did and renders the same."""
    path = table_path(json_path)
    text = f"# {title}\n\n```text\n{table.rstrip()}\n```\n\nData: `{Path(json_path).name}`\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_report(report: dict, json_path, table: str, title: str) -> list[Path]:
    """A bench's JSON report and, beside it, the table it printed (`write_table`); the paths written."""
    return [write_json(report, json_path), write_table(table, json_path, title)]
