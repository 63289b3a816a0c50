"""`bench winograd`: every 3x3 convolution shape of a UNet and VAE decoder, F.conv2d vs the chosen Winograd.

Shapes (with how often each occurs) are collected by running the real architecture once at the
requested size; each shape is then timed side by side (F.conv2d and every Winograd candidate,
warmed up, median of repeats) through the same calibration the unit uses, and whole-module times
are measured with and without the patch.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F

from .capabilities import machine_summary

log = logging.getLogger(__name__)


def collect_shapes(module: torch.nn.Module, call: Callable[[], object]) -> Counter:
    """(n, c, k, h, w, pad) -> how many times an eligible 3x3 convolution ran with it during `call()`."""
    from ..kernels.winograd import conv_padding, is_eligible

    seen: Counter = Counter()
    hooks = []
    for conv in module.modules():
        if type(conv) is torch.nn.Conv2d and is_eligible(conv):
            def hook(mod, args, pad=conv_padding(conv)):
                n, c, h, w = args[0].shape
                seen[(n, c, mod.out_channels, h, w, pad)] += 1
            hooks.append(conv.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            call()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _rel_err(n, c, k, h, w, pad, m: int, seed: int = 1) -> float:
    """max |winograd - conv2d| / max |conv2d| on random data for one shape and tile."""
    from ..kernels.winograd import filter_transform, pack_filters, winograd_conv2d

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)
    bias = torch.randn(k, generator=g) * 0.1
    with torch.inference_mode():
        ref = F.conv2d(x, weight, bias, padding=pad)
        u = filter_transform(weight, m)
        out = winograd_conv2d(x, u, bias, m=m, padding=pad, packed=pack_filters(u, 64))
    return float((out - ref).abs().max() / ref.abs().max())


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _shape_rows(shapes: Counter, calibration, section: str) -> list[dict]:
    from ..kernels.calibrate import best_choice

    rows = []
    for (n, c, k, h, w, pad), count in sorted(shapes.items(), key=lambda kv: (-kv[0][3], kv[0][1])):
        timings = calibration.timings(n, c, k, h, w, pad, torch.float32, torch.device("cpu"))
        kind, m, band = best_choice(timings)
        conv_ms = timings["conv2d"] * 1e3
        chosen_ms = conv_ms if kind == "conv2d" else timings[f"f{m}b{band}"] * 1e3
        best_wino = min((v, name) for name, v in timings.items() if name.startswith("f") and not
                        name.startswith("filter"))
        err_tile = m if kind == "winograd" else int(best_wino[1][1:best_wino[1].index("b")])
        rows.append({"section": section, "shape": f"N{n} C{c} {h}x{w} -> K{k}", "n": n, "c": c, "k": k, "h": h,
                     "w": w, "padding": pad, "count": count, "conv2d_ms": round(conv_ms, 3),
                     "winograd_ms": round(chosen_ms, 3), "best_winograd_ms": round(best_wino[0] * 1e3, 3),
                     "tile": f"F({m},3)" + (f" band {band}" if band else "") if kind == "winograd" else "conv2d",
                     "speedup": round(conv_ms / chosen_ms, 3),
                     "max_rel_err": _rel_err(n, c, k, h, w, pad, err_tile)})
    return rows


def _summed(rows, section: str) -> float:
    sel = [r for r in rows if r["section"] == section]
    conv = sum(r["conv2d_ms"] * r["count"] for r in sel)
    wino = sum(r["winograd_ms"] * r["count"] for r in sel)
    return round(conv / wino, 3) if wino else 1.0


def run_winograd_bench(family: str = "sd15", size: int = 512, *, repeats: int = 3, batch: int = 2,
                       calibration_dir: str | None = None, tiny: bool = False,
                       say: Callable[[str], None] = print) -> dict:
    """Measure every UNet and VAE-decoder 3x3 conv shape of `family` at `size`, and the whole modules."""
    from ..kernels.calibrate import Calibration
    from .families import get_family
    from .registry import ApplyContext, apply_all, remove_all
    from .synthetic import build_components
    from .units.winograd import WinogradConfig

    from .allocator import keep_freed_memory

    keep_freed_memory()  # as bench does: page-fault costs would otherwise drift between the timings
    fam = get_family(family)
    say(f"building {fam.name} (random weights) ...")
    comps = build_components(fam.name, tiny=tiny)
    unet, vae = comps["unet"], comps["vae"]
    lat = size // 8
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, unet.config.in_channels, lat, lat, generator=g)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":
        ids = 5 if fam.name == "sdxl-refiner" else 6
        pooled = unet.add_embedding.linear_1.in_features - ids * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled, generator=g),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size][:ids]] * batch, dtype=torch.float32)}
    latent = torch.randn(1, vae.config.latent_channels, lat, lat, generator=g)

    def unet_step():
        return unet(sample, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample

    def vae_decode():
        return vae.decode(latent).sample

    unet_shapes = collect_shapes(unet, unet_step)
    vae_shapes = collect_shapes(vae.decoder, vae_decode)
    say(f"{sum(unet_shapes.values())} UNet convs in {len(unet_shapes)} shapes, {sum(vae_shapes.values())} VAE "
        f"decoder convs in {len(vae_shapes)} shapes; measuring each (calibration is cached per machine) ...")
    calibration = Calibration(calibration_dir, repeats=repeats)
    start = time.perf_counter()
    rows = _shape_rows(unet_shapes, calibration, "unet") + _shape_rows(vae_shapes, calibration, "vae_decoder")
    calibration_s = time.perf_counter() - start

    class _Pipe:  # the unit patches pipe.unet / pipe.vae
        pass

    holder = _Pipe()
    holder.unet, holder.vae = unet, vae
    with torch.inference_mode():
        ref_unet, ref_vae = unet_step(), vae_decode()
        say("timing the whole UNet step and VAE decode, plain and with Winograd ...")
        plain_unet = _median_time(unet_step, repeats)
        plain_vae = _median_time(vae_decode, repeats)
        handles = apply_all(holder, [WinogradConfig(vae=True, calibration_dir=calibration_dir or "")],
                            ApplyContext(device=torch.device("cpu"), family=fam))
        try:
            out_unet, out_vae = unet_step(), vae_decode()
            wino_unet = _median_time(unet_step, repeats)
            wino_vae = _median_time(vae_decode, repeats)
            cache_mb = handles[0].info["patched"][0].cache.peak / 2**20 if handles[0].info["patched"] else 0.0
        finally:
            remove_all(handles)
    summary = {
        "unet_speedup": _summed(rows, "unet"), "vae_decoder_speedup": _summed(rows, "vae_decoder"),
        "unet_step_speedup": round(plain_unet / wino_unet, 3), "vae_decode_speedup": round(plain_vae / wino_vae, 3),
        "unet_step_s": {"conv2d": round(plain_unet, 3), "winograd": round(wino_unet, 3)},
        "vae_decode_s": {"conv2d": round(plain_vae, 3), "winograd": round(wino_vae, 3)},
        "max_rel_err": max(r["max_rel_err"] for r in rows),
        "unet_output_rel_err": float((out_unet - ref_unet).abs().max() / ref_unet.abs().max()),
        "vae_output_rel_err": float((out_vae - ref_vae).abs().max() / ref_vae.abs().max()),
        "min_shape_speedup": min(r["speedup"] for r in rows),
        "filter_cache_mb": round(cache_mb, 1), "calibration_s": round(calibration_s, 1),
    }
    return {"machine": machine_summary(), "family": fam.name, "size": size, "batch": batch, "repeats": repeats,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "summary": summary}


def format_winograd_table(report: dict) -> str:
    header = f"{'section':<12} {'shape':<28} {'count':>5} {'conv2d ms':>10} {'winograd ms':>12} {'tile':<16} " \
             f"{'speedup':>8} {'max rel err':>11}"
    lines = [header, "-" * len(header)]
    for r in report["rows"]:
        lines.append(f"{r['section']:<12} {r['shape']:<28} {r['count']:>5} {r['conv2d_ms']:>10.2f} "
                     f"{r['winograd_ms']:>12.2f} {r['tile']:<16} {r['speedup']:>7.2f}x {r['max_rel_err']:>11.1e}")
    s = report["summary"]
    lines.append(f"summed over shapes: UNet {s['unet_speedup']:.2f}x, VAE decoder {s['vae_decoder_speedup']:.2f}x; "
                 f"whole UNet step {s['unet_step_speedup']:.2f}x ({s['unet_step_s']['conv2d']:.2f}s -> "
                 f"{s['unet_step_s']['winograd']:.2f}s), whole VAE decode {s['vae_decode_speedup']:.2f}x "
                 f"({s['vae_decode_s']['conv2d']:.2f}s -> {s['vae_decode_s']['winograd']:.2f}s)")
    lines.append(f"max rel err per shape {s['max_rel_err']:.1e}; UNet output {s['unet_output_rel_err']:.1e}, VAE "
                 f"output {s['vae_output_rel_err']:.1e}; filter cache {s['filter_cache_mb']:.0f} MB; "
                 f"{report['family']} {report['size']}x{report['size']} batch {report['batch']}, "
                 f"{report['machine'].get('cpu')} ({report['machine'].get('torch_threads')} threads)")
    return "\n".join(lines)
