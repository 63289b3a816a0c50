"""`bench comfyui`: SDAccel's MODEL patches timed inside a real ComfyUI, beside the engine's own pipeline.

A ComfyUI checkout and its venv are started on 127.0.0.1 with this pack linked in and an SD 1.5 checkpoint of the
real architecture (random weights, the cost of trained ones) written for it. Each variant is a core KSampler
prompt (Load Checkpoint -> [patches] -> KSampler -> SaveLatent): one warm-up (which pays calibrations and
compiles), then the same seeds for every variant; only the seed changes between repeats, so ComfyUI re-runs
KSampler alone and its own history timestamps time it. Each image (decoded here with the checkpoint's VAE) is
compared with the baseline's of the same seed. The engine then runs the same toggle on the same architecture,
and each patch's speedup is set against the engine's (the denoise loop only, as KSampler): a patch should reach
90% of it.
"""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..spec.errors import ConfigError

CHECKPOINT = "sdaccel-bench-sd15.safetensors"
TARGET_SHARE = 0.9  # a patch should reach this share of the engine's speedup for the same toggle
_WINOGRAD = {"tile": "auto", "fused_transforms": False}


@dataclass(frozen=True)
class Variant:
    """A KSampler prompt's patches (node type, widget values) and the engine toggle it matches."""

    description: str
    patches: tuple = ()
    engine: tuple | None = None  # (optimization kind, fields) or ("request", fields); None: nothing to match
    reference: str = "baseline"  # the variant this one's speedup is against (PSNR is always against the baseline)


VARIANTS: dict[str, Variant] = {
    "baseline": Variant("KSampler on ComfyUI's model, unpatched", engine=("request", {})),
    "winograd": Variant("SDAccel Winograd (model), tile auto, eager transforms",
                        (("SDAccelWinogradModel", _WINOGRAD),), ("winograd", {"vae": False, **_WINOGRAD})),
    "deepcache": Variant("SDAccel DeepCache (model), interval 3, branch 0",
                         (("SDAccelDeepCacheModel", {"cache_interval": 3, "cache_branch_id": 0}),),
                         ("deepcache", {"cache_interval": 3, "cache_branch_id": 0})),
    "cfg-cutoff": Variant("SDAccel CFG Cutoff (model) after 50% of the steps",
                          (("SDAccelCFGCutoffModel", {"cfg_cutoff": 0.5}),), ("request", {"cfg_cutoff": 0.5})),
    "precision-half": Variant("SDAccel Precision (model), half (bf16 on CPUs that have it)",
                              (("SDAccelPrecisionModel", {"dtype": "half", "channels_last": False}),),
                              ("precision", {"unet": "half"})),
    "comfy-compute-bf16": Variant("ComfyUI's own ModelComputeDtype bf16 (casts the weights in every call)",
                                  (("ModelComputeDtype", {"dtype": "bf16"}),), ("precision", {"unet": "half"})),
    "channels-last": Variant("SDAccel Precision (model), fp32 with channels-last weights",
                             (("SDAccelPrecisionModel", {"dtype": "fp32", "channels_last": True}),),
                             ("channels_last", {"unet": True, "vae": False})),
    "attention-pytorch": Variant("SDAccel Attention (model): ComfyUI's pytorch attention instead of its CPU default "
                                 "(sub-quadratic); the engine's pipeline already uses SDPA",
                                 (("SDAccelAttentionModel", {"backend": "pytorch"}),)),
    "fastest": Variant("Attention pytorch + Precision half + DeepCache (interval 3) + CFG cutoff 50%: the "
                       "ksampler-fastest workflow (Winograd left out: it runs fp32 only)",
                       (("SDAccelAttentionModel", {"backend": "auto"}),
                        ("SDAccelPrecisionModel", {"dtype": "half", "channels_last": False}),
                        ("SDAccelDeepCacheModel", {"cache_interval": 3, "cache_branch_id": 0}),
                        ("SDAccelCFGCutoffModel", {"cfg_cutoff": 0.5}))),
    "compile-openvino": Variant("SDAccel Compile (model), OpenVINO",
                                (("SDAccelCompileModel", {"backend": "openvino"}),),
                                ("compile", {"backend": "openvino"})),
    "compile-inductor": Variant("SDAccel Compile (model), inductor (torch.compile) with the weights frozen in",
                                (("SDAccelCompileModel", {"backend": "inductor"}),),
                                ("compile", {"backend": "inductor", "freezing": True})),
    # The same toggles behind the Attention patch, timed against it: ComfyUI with the attention the engine runs
    # (SDPA), so the toggle's own gain is compared with the engine's like for like.
    "sdpa+cfg-cutoff": Variant("Attention pytorch + CFG cutoff 50%, against Attention pytorch alone",
                               (("SDAccelAttentionModel", {"backend": "pytorch"}),
                                ("SDAccelCFGCutoffModel", {"cfg_cutoff": 0.5})),
                               ("request", {"cfg_cutoff": 0.5}), reference="attention-pytorch"),
    "sdpa+deepcache": Variant("Attention pytorch + DeepCache (interval 3, branch 0), against Attention pytorch alone",
                              (("SDAccelAttentionModel", {"backend": "pytorch"}),
                               ("SDAccelDeepCacheModel", {"cache_interval": 3, "cache_branch_id": 0})),
                              ("deepcache", {"cache_interval": 3, "cache_branch_id": 0}),
                              reference="attention-pytorch"),
    "sdpa+winograd": Variant("Attention pytorch + Winograd, against Attention pytorch alone",
                             (("SDAccelAttentionModel", {"backend": "pytorch"}), ("SDAccelWinogradModel", _WINOGRAD)),
                             ("winograd", {"vae": False, **_WINOGRAD}), reference="attention-pytorch"),
}


@dataclass
class ComfyBenchSettings:
    comfyui: str
    python: str
    size: int = 256
    steps: int = 10
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    cfg: float = 7.0
    variants: list = field(default_factory=lambda: list(VARIANTS))
    engine: bool = True  # also run the engine's pipeline with the same toggles
    model: str = "sd15"  # sd15: the real architecture; sd15-shallow: a two-level UNet (the tests' quick run)


MODELS = ("sd15", "sd15-shallow")


def run_order(variants: list[str]) -> list[str]:
    """The baseline first, then each variant's reference (added if missing) before the variants timed against
    it, otherwise in the order given."""
    order: list[str] = ["baseline"]
    for name in variants:
        for needed in (VARIANTS[name].reference, name):
            if needed not in order:
                order.append(needed)
    return order


def widget_defaults(server, node_type: str) -> dict:
    """The node's widgets at the defaults ComfyUI's /object_info declares."""
    required = server.request(f"/object_info/{node_type}")[node_type]["input"]["required"]
    values = {}
    for name, spec in required.items():
        if isinstance(spec[0], list):
            values[name] = (spec[1] if len(spec) > 1 else {}).get("default", spec[0][0])
        elif spec[0] in ("INT", "FLOAT", "BOOLEAN", "STRING"):
            values[name] = spec[1].get("default", "" if spec[0] == "STRING" else 0)
    return values


def ksampler_prompt(server, variant: Variant, *, size: int, steps: int, cfg: float, seed: int, prefix: str) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff at dusk", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"bench/{prefix}"}},
    }
    model = ["1", 0]
    for i, (node_type, values) in enumerate(variant.patches):
        node = str(20 + i)
        prompt[node] = {"class_type": node_type,
                        "inputs": {**widget_defaults(server, node_type), **values, "model": model}}
        model = [node, 0]
    prompt["7"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    return prompt


def _saved_latent(server, entry: dict):
    import torch
    from safetensors.torch import load_file

    saved = entry["outputs"]["9"]["latents"][0]
    path = server.base / "output" / saved["subfolder"] / saved["filename"]
    return load_file(str(path))["latent_tensor"].to(torch.float32)


def _decode(vae, latent):
    import torch

    with torch.inference_mode():
        image = vae.decode(latent.to(vae.dtype)).sample.float()
    return ((image + 1) / 2).clamp(0, 1)


def _spread(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3), "runs_s": [round(t, 3) for t in times]}


def _native_rows(server, settings: ComfyBenchSettings, vae, say) -> list[dict]:
    from .comfyui_server import HostError, execution_seconds
    from .metrics import psnr_db, ssim

    seeds = [settings.seed + 1 + i for i in range(settings.repeats)]
    rows, reference = [], None
    for name in settings.variants:
        variant = VARIANTS[name]
        say(f"[comfy] {name}: {variant.description}")
        try:
            warm = []
            for w in range(settings.warmup):
                entry, _ = server.run(ksampler_prompt(server, variant, size=settings.size, steps=settings.steps,
                                                      cfg=settings.cfg, seed=settings.seed + 1000 + w,
                                                      prefix=f"{name}-warm"))
                warm.append(execution_seconds(entry))
            times, first = [], None
            for seed in seeds:
                entry, _ = server.run(ksampler_prompt(server, variant, size=settings.size, steps=settings.steps,
                                                      cfg=settings.cfg, seed=seed, prefix=name))
                times.append(execution_seconds(entry))
                first = first if first is not None else _saved_latent(server, entry)
                say(f"        seed {seed}: {times[-1]:.2f} s")
        except HostError as exc:
            say(f"[skip ] {name}: {str(exc)[:300]}")
            rows.append({"variant": name, "skipped": str(exc)[:2000]})
            continue
        image = _decode(vae, first)
        row = {"variant": name, "description": variant.description, **_spread(times),
               "warmup_s": [round(t, 3) for t in warm], "psnr_db": None, "ssim": None}
        if name == "baseline":
            reference = image
        elif reference is not None:
            psnr = psnr_db(image, reference)
            row["psnr_db"] = None if psnr == float("inf") else round(psnr, 2)
            row["identical_to_baseline"] = psnr == float("inf")
            row["ssim"] = round(ssim(image, reference), 4)
        rows.append(row)
    return rows


def _engine_denoise(settings: ComfyBenchSettings, say) -> dict[str, dict]:
    """name -> the engine's denoise-loop timings for the variant's toggle (the same architecture and size)."""
    from ..run.cache import PipelineCache
    from ..run.sampler import run
    from ..spec.errors import SDAccelError
    from ..spec.model_ref import ModelRef
    from ..spec.optimization import config_class
    from ..spec.pipeline import GenerationRequest, PipelineSpec
    from ..testing import enable_synthetic

    enable_synthetic()
    cache = PipelineCache(max_entries=1)
    base_spec = PipelineSpec(model=ModelRef.synthetic("sd15"), device="cpu")
    base_request = GenerationRequest(prompt="a lighthouse on a cliff at dusk", width=settings.size,
                                     height=settings.size, steps=settings.steps, seed=settings.seed, cfg=settings.cfg)
    out = {}
    done: dict[tuple, dict] = {}
    for name in settings.variants:
        toggle = VARIANTS[name].engine
        if toggle is None:
            continue
        key = (toggle[0], tuple(sorted(toggle[1].items())))
        if key in done:
            out[name] = done[key]
            continue
        kind, fields = toggle
        spec, request = base_spec, base_request
        if kind == "request":
            request = request.with_(**fields)
        else:
            spec = spec.with_optimization(config_class(kind)(**fields))
        say(f"[engine] {name}: {kind} {fields}")
        try:
            for w in range(settings.warmup):
                run(spec, request.with_(seed=settings.seed + 1000 + w), cache=cache, strict=True)
            times = [run(spec, request.with_(seed=settings.seed + 1 + i), cache=cache, strict=True)
                     .stats.stage_s["denoise"] for i in range(settings.repeats)]
        except SDAccelError as exc:
            say(f"[skip  ] {name}: {exc}")
            out[name] = done[key] = {"skipped": str(exc)}
            continue
        out[name] = done[key] = _spread(times)
    return out


def run_comfyui_bench(settings: ComfyBenchSettings, *, say: Callable[[str], None] = print,
                      workdir: str | None = None) -> dict:
    """Start ComfyUI, time every variant there and in the engine; return the report (rows in the given order)."""
    if settings.model not in MODELS:
        raise ConfigError("bench comfyui model", f"unknown {settings.model!r}", f"use one of {', '.join(MODELS)}")
    if settings.model != "sd15" and settings.engine:
        raise ConfigError("bench comfyui model", f"{settings.model} has no engine counterpart",
                          "run it with engine=False (--no-engine)")
    unknown = [v for v in settings.variants if v not in VARIANTS]
    if unknown:
        raise ConfigError("bench comfyui --variants", f"unknown {', '.join(unknown)}",
                          f"choose from {', '.join(VARIANTS)} (comma-separated)")
    settings.variants = run_order(settings.variants)
    for name, value, low in (("repeats", settings.repeats, 1), ("warmup", settings.warmup, 0),
                             ("size", settings.size, 64), ("steps", settings.steps, 1)):
        if value < low:
            raise ConfigError(f"bench --{name}", f"{value!r} is below {low}", f"use --{name} {max(low, 1)} or more")
    base = Path(workdir or tempfile.mkdtemp(prefix="sdaccel-comfy-bench-"))
    try:
        return _bench_in(base, settings, say)
    finally:
        if workdir is None:  # the checkpoint written here is 2 GB: nothing of it is kept
            shutil.rmtree(base, ignore_errors=True)


def _bench_in(base: Path, settings: ComfyBenchSettings, say) -> dict:
    from ..run.allocator import release_free_memory
    from ..run.capabilities import machine_summary
    from ..testing.random_weights import build_host_shaped_sd15, build_pipeline, write_single_file
    from .comfyui_server import launch

    say(f"writing an SD 1.5 checkpoint ({settings.model}, random weights) into {base} ...")
    pipe = build_pipeline("sd15") if settings.model == "sd15" else build_host_shaped_sd15()
    write_single_file(pipe, "sd15", base / "models" / "checkpoints" / CHECKPOINT, dtype="float16")
    vae = pipe.vae.eval()
    del pipe
    gc.collect()
    release_free_memory()  # the driver keeps only the VAE while ComfyUI runs beside it (bench keeps freed memory)
    say(f"starting ComfyUI from {settings.comfyui} on 127.0.0.1 ...")
    server = launch(Path(settings.comfyui), settings.python, base, client_id="sdaccel-bench")
    try:
        rows = _native_rows(server, settings, vae, say)
    finally:
        server.stop()
    engine = _engine_denoise(settings, say) if settings.engine else {}
    timed = {r["variant"]: r for r in rows if "median_s" in r}
    base_engine = engine.get("baseline", {}).get("median_s")
    for row in rows:
        if "median_s" not in row:
            continue
        reference = VARIANTS[row["variant"]].reference
        base_native = timed.get(reference, {}).get("median_s")
        row["speedup"] = round(base_native / row["median_s"], 3) if base_native else None
        if reference != "baseline":
            row["speedup_against"] = reference
        theirs = engine.get(row["variant"], {})
        row["engine_denoise"] = theirs
        if "median_s" in theirs and base_engine:
            row["engine_speedup"] = round(base_engine / theirs["median_s"], 3)
            gain, engine_gain = row["speedup"] - 1, row["engine_speedup"] - 1
            row["share_of_engine_gain"] = round(gain / engine_gain, 3) if abs(engine_gain) > 0.02 else None
    return {"machine": machine_summary(), "host": {"comfyui": settings.comfyui, "start_s": server.timings["start_s"]},
            "settings": {k: v for k, v in settings.__dict__.items() if k not in ("comfyui", "python")},
            "family": settings.model, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}


def format_comfyui_table(report: dict) -> str:
    header = (f"{'variant':<20} {'median s':>9} {'min s':>7} {'max s':>7} {'speedup':>8} {'engine':>7} "
              f"{'share':>6} {'PSNR dB':>8} {'SSIM':>6}")
    lines = [header, "-" * len(header)]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"{r['variant']:<20} skipped: {r['skipped'][:100]}")
            continue
        psnr = "same" if r.get("identical_to_baseline") else ("-" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}")
        engine = f"{r['engine_speedup']:.2f}x" if r.get("engine_speedup") else "-"
        share = f"{r['share_of_engine_gain']:.0%}" if r.get("share_of_engine_gain") is not None else "-"
        ssim_text = "-" if r["ssim"] is None else f"{r['ssim']:.3f}"
        lines.append(f"{r['variant']:<20} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['max_s']:>7.3f} "
                     f"{(r['speedup'] or 0):>7.2f}x {engine:>7} {share:>6} {psnr:>8} {ssim_text:>6}")
    s, m = report["settings"], report["machine"]
    lines.append(f"{report['family']} {s['size']}x{s['size']}, {s['steps']} steps euler/normal, cfg {s['cfg']}, "
                 f"{s['repeats']} seeds after {s['warmup']} warm-up; {m.get('cpu')} ({m.get('torch_threads')} "
                 f"threads). Time = "
                 f"KSampler in ComfyUI (its history timestamps); speedup against the baseline, or for sdpa+* "
                 f"against attention-pytorch; engine = the engine's denoise loop with the same toggle; share = the "
                 f"patch's gain over the engine's (target {TARGET_SHARE:.0%}); PSNR/SSIM against the baseline image "
                 f"of the same seed")
    return "\n".join(lines)


def write_comfyui_chart(report: dict, path) -> Path:
    """Native and engine speedups per variant, side by side (matplotlib), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .runner import save_figure

    rows = [r for r in report["rows"] if "median_s" in r]
    names = [r["variant"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.45 * len(rows) + 1.5)))
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r["speedup"] or 0 for r in rows], height=0.4, label="MODEL patch in ComfyUI")
    ax.barh([y + 0.2 for y in ys], [r.get("engine_speedup") or 0 for r in rows], height=0.4,
            label="engine pipeline, same toggle")
    ax.set_yticks(list(ys), names)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup vs baseline (x)")
    ax.legend(loc="lower right")
    s = report["settings"]
    ax.set_title(f"SD1.5 {s['size']}x{s['size']}, {s['steps']} steps, {report['machine'].get('cpu')}")
    return save_figure(fig, path)
