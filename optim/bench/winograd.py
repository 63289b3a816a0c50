"""`bench winograd`: every 3x3 convolution shape of a UNet and VAE decoder, F.conv2d vs the chosen Winograd.

Shapes (with how often each occurs) are collected by running the real architecture once at the
requested size; each shape is then timed side by side (F.conv2d and every Winograd candidate,
warmed up, median of repeats) through the same calibration the unit uses, and whole-module times
are measured with and without the patch.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F

from ..run.capabilities import machine_summary
from .timing import median_seconds

log = logging.getLogger(__name__)


def collect_shapes(module: torch.nn.Module, call: Callable[[], object]) -> Counter:
    """(n, c, k, h, w, pad) -> how many times an eligible 3x3 convolution ran with it during `call()`."""
    from ...cpukernels.winograd import conv_padding, is_eligible

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


def _rel_err(n, c, k, h, w, pad, m: int, seed: int = 1, *, fused: bool = False, channels_last: bool = False,
             native_block: int = 0) -> float:
    """max |winograd - conv2d| / max |conv2d| on random data for one shape and tile, run as the unit runs it
    (`native_block` != 0: the native kernel with that block)."""
    from ...cpukernels.winograd import filter_transform, native_conv2d, pack_filters, winograd_conv2d

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)
    bias = torch.randn(k, generator=g) * 0.1
    with torch.inference_mode():
        ref = F.conv2d(x, weight, bias, padding=pad)
        if native_block:
            out = native_conv2d(x, weight, bias, m=m, padding=pad, block=native_block)
        else:
            u = filter_transform(weight, m)
            out = winograd_conv2d(x, u, bias, m=m, padding=pad, packed=pack_filters(u, 64), fused=fused)
    return float((out - ref).abs().max() / ref.abs().max())


def _choice_label(kind: str, m: int, band: int) -> str:
    if kind == "winograd":
        return f"F({m},3)" + (f" band {band}" if band else "")
    if kind == "native":
        return f"F({m},3) " + (f"{band} tiles" if band > 0 else f"{-band} ch")
    return "conv2d"


def _shape_rows(shapes: Counter, calibration, section: str, channels_last: bool = False) -> list[dict]:
    from ...cpukernels.calibrate import native_name, parse_candidate, parse_native, ranked_choices, stored_alternative

    rows = []
    for (n, c, k, h, w, pad), count in sorted(shapes.items(), key=lambda kv: (-kv[0][3], kv[0][1])):
        timings = calibration.timings(n, c, k, h, w, pad, torch.float32, torch.device("cpu"), channels_last)
        choice = ranked_choices(timings)[0]
        kind, m, band = choice
        conv_ms = timings["conv2d"] * 1e3
        if kind == "native":
            chosen_ms = timings[native_name(m, "t" if band > 0 else "k", abs(band))] * 1e3
        else:
            chosen_ms = conv_ms if kind == "conv2d" else timings[f"f{m}b{band}"] * 1e3
        candidates = [(v, name) for name, v in timings.items()
                      if parse_candidate(name) is not None or (parse_native(name) and not name.endswith("s"))]
        best_wino = min(candidates)
        if kind == "conv2d":  # the error the best Winograd candidate would have had
            if parse_native(best_wino[1]):
                bm, split, block = parse_native(best_wino[1])
                err_m, err_block = bm, block if split == "t" else -block
            else:
                err_m, err_block = parse_candidate(best_wino[1])[0], 0
        else:
            err_m, err_block = m, band if kind == "native" else 0
        rows.append({"section": section, "shape": f"N{n} C{c} {h}x{w} -> K{k}", "n": n, "c": c, "k": k, "h": h,
                     "w": w, "padding": pad, "count": count, "conv2d_ms": round(conv_ms, 3),
                     "winograd_ms": round(chosen_ms, 3), "best_winograd_ms": round(best_wino[0] * 1e3, 3),
                     "kept_filters_save_ms": round((stored_alternative(timings, choice) or (0.0,))[0] * 1e3, 3),
                     "tile": _choice_label(kind, m, band), "speedup": round(conv_ms / chosen_ms, 3),
                     "max_rel_err": _rel_err(n, c, k, h, w, pad, err_m, fused=calibration.fused,
                                             channels_last=channels_last, native_block=err_block)})
    return rows


def _scratch_bytes() -> int:
    from ...cpukernels.native import scratch_bytes
    from ...cpukernels.winograd import workspace_bytes

    return scratch_bytes() + workspace_bytes()


def _time_pytorch_kernel(holder, sections, plain, repeats, calibration_dir, fused_transforms, fam, say,
                         profiles: dict | None = None) -> dict:
    """The same whole modules with the PyTorch Winograd (its own calibration and automatic filter budget), in the
    same process, for the side-by-side comparison."""
    from ..core.registry import ApplyContext, apply_all, remove_all
    from ..units.winograd.unit import WinogradConfig

    say("timing the whole modules with the PyTorch Winograd ...")
    handles = apply_all(holder, [WinogradConfig(unet="unet" in sections, vae="vae_decoder" in sections,
                                                calibration_dir=calibration_dir or "",
                                                fused_transforms=fused_transforms, kernel="pytorch")],
                        ApplyContext(device=torch.device("cpu"), family=fam))
    found: dict = {}
    try:
        for name, (_, call, _, whole_key) in sections.items():
            call()  # measures its shapes the first time
            timed = median_seconds(call, repeats)
            found[f"{whole_key}_s"] = round(timed, 3)
            found[f"{whole_key}_speedup"] = round(plain[name] / timed, 3)
            if profiles is not None:
                profiles[name]["pytorch winograd"] = profile_call(call)
        patched = handles[0].info["patched"]
        found["filter_cache_mb"] = round(patched[0].cache.peak / 2**20, 1) if patched else 0.0
        found["scratch_mb"] = round(_scratch_bytes() / 2**20, 1)
    finally:
        remove_all(handles)
    return found


PROFILE_TOP = 8  # operations listed per profiled module call


def profile_call(call: Callable[[], object], top: int = PROFILE_TOP) -> list[dict]:
    """Where one call's time goes: the operations with the most own CPU time (PyTorch profiler), with their share.
    The native kernel shows as one operation (`sdaccel_winograd::conv2d`); the PyTorch Winograd as the gathers,
    GEMMs and copies it is made of."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count,
             "share": round(e.self_cpu_time_total / total, 3)} for e in events[:top]]


def _summed(rows, section: str) -> float:
    sel = [r for r in rows if r["section"] == section]
    conv = sum(r["conv2d_ms"] * r["count"] for r in sel)
    wino = sum(r["winograd_ms"] * r["count"] for r in sel)
    return round(conv / wino, 3) if wino else 1.0


def run_winograd_bench(family: str = "sd15", size: int = 512, *, repeats: int = 3, batch: int = 2,
                       calibration_dir: str | None = None, tiny: bool = False, channels_last: bool = False,
                       fused_transforms: bool = True, modules=("unet", "vae_decoder"), kernel: str = "auto",
                       filter_cache_mb: int = 0, compare_pytorch: bool = False, profile: bool = False,
                       say: Callable[[str], None] = print) -> dict:
    """Measure every UNet and VAE-decoder 3x3 conv shape of `family` at `size`, and the whole modules.

    `channels_last` runs both sides (F.conv2d and Winograd, shapes and whole modules) on NHWC activations,
    i.e. measures Winograd on top of the channels-last unit. `fused_transforms` as in the unit's option.
    `modules` limits the run to "unet" or "vae_decoder" (SDXL's UNet and VAE at 1024x1024 do not both fit in
    24 GB of RAM next to the calibration's buffers). `profile` adds where each whole module's time goes.
    """
    from ...cpukernels.calibrate import Calibration
    from ...cpukernels.fused import fused_transforms_work
    from ..core.registry import ApplyContext, apply_all, remove_all
    from ..models.families import get_family
    from ..testing.random_weights import build_components
    from ..units.winograd.unit import WinogradConfig

    unknown = set(modules) - {"unet", "vae_decoder"}
    if unknown or not modules:
        raise ValueError(f"bench winograd --modules: unknown {sorted(unknown) or '(none given)'}; use unet, "
                         f"vae_decoder or both, comma-separated")

    fam = get_family(family)
    say(f"building {fam.name} (random weights) ...")
    comps = build_components(fam.name, tiny=tiny)
    unet, vae = comps["unet"], comps["vae"]
    del comps  # the text encoders are not measured: give their memory back (SDXL's take about 3 GB)
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
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
        sample = sample.contiguous(memory_format=torch.channels_last)
        latent = latent.contiguous(memory_format=torch.channels_last)

    def unet_step():
        return unet(sample, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample

    def vae_decode():
        return vae.decode(latent).sample

    # section -> (module whose convolutions are measured, the whole-module call, summary names)
    sections = {"unet": (unet, unet_step, "unet_speedup", "unet_step"),
                "vae_decoder": (vae.decoder, vae_decode, "vae_decoder_speedup", "vae_decode")}
    sections = {name: sections[name] for name in sections if name in modules}
    shapes = {name: collect_shapes(module, call) for name, (module, call, _, _) in sections.items()}
    say("; ".join(f"{sum(found.values())} {name} convs in {len(found)} shapes" for name, found in shapes.items())
        + "; measuring each (calibration is cached per machine) ...")
    from ...cpukernels.native import native_ops

    native = kernel != "pytorch" and native_ops() is not None  # as the unit decides
    fused = not native and fused_transforms and fused_transforms_work()
    calibration = Calibration(calibration_dir, repeats=repeats, fused=fused, native=native)
    start = time.perf_counter()
    rows = [row for name, found in shapes.items() for row in _shape_rows(found, calibration, name, channels_last)]
    calibration_s = time.perf_counter() - start

    class _Pipe:  # the unit patches pipe.unet / pipe.vae
        pass

    holder = _Pipe()
    holder.unet, holder.vae = unet, vae
    summary: dict = {}
    plain, refs = {}, {}
    profiles: dict | None = {name: {} for name in sections} if profile else None
    with torch.inference_mode():
        say("timing the whole modules, plain and with Winograd ...")
        for name, (_, call, _, _) in sections.items():
            refs[name] = call()
            plain[name] = median_seconds(call, repeats)
            if profiles is not None:
                profiles[name]["conv2d"] = profile_call(call)
        handles = apply_all(holder, [WinogradConfig(unet="unet" in sections, vae="vae_decoder" in sections,
                                                    calibration_dir=calibration_dir or "",
                                                    fused_transforms=fused_transforms, kernel=kernel,
                                                    filter_cache_mb=filter_cache_mb)],
                            ApplyContext(device=torch.device("cpu"), family=fam))
        try:
            planner = handles[0].info["planner"]
            for name, (_, call, summed_key, whole_key) in sections.items():
                out = call()
                timed = median_seconds(call, repeats)
                summary[summed_key] = _summed(rows, name)
                summary[f"{whole_key}_speedup"] = round(plain[name] / timed, 3)
                summary[f"{whole_key}_s"] = {"conv2d": round(plain[name], 3), "winograd": round(timed, 3)}
                summary[f"{name.split('_')[0]}_output_rel_err"] = float((out - refs[name]).abs().max()
                                                                         / refs[name].abs().max())
            if native:  # the runs above transformed every filter on the fly; now with the budget given out
                kept = planner.allocate_storage()
                for name, (_, call, _, whole_key) in sections.items():
                    call()
                    timed = median_seconds(call, repeats)
                    summary[f"{whole_key}_s"]["winograd_kept_filters"] = round(timed, 3)
                    summary[f"{whole_key}_speedup_kept_filters"] = round(plain[name] / timed, 3)
                summary["layers_keeping_filters"] = kept
            if profiles is not None:
                for name, (_, call, _, _) in sections.items():
                    profiles[name]["native winograd" if native else "pytorch winograd"] = profile_call(call)
            cache_mb = handles[0].info["patched"][0].cache.peak / 2**20 if handles[0].info["patched"] else 0.0
            summary["filter_budget_mb"] = round(handles[0].info["patched"][0].cache.budget / 2**20, 1) \
                if handles[0].info["patched"] else 0.0
            summary["scratch_mb"] = round(_scratch_bytes() / 2**20, 1)
        finally:
            remove_all(handles)
        if native and compare_pytorch:
            summary["pytorch_kernel"] = _time_pytorch_kernel(holder, sections, plain, repeats, calibration_dir,
                                                             fused_transforms, fam, say, profiles)
    if profiles is not None:
        summary["profile"] = profiles
    summary.update({
        "max_rel_err": max(r["max_rel_err"] for r in rows),
        "min_shape_speedup": min(r["speedup"] for r in rows),
        "filter_cache_mb": round(cache_mb, 1), "calibration_s": round(calibration_s, 1),
    })
    return {"machine": machine_summary(), "family": fam.name, "size": size, "batch": batch, "repeats": repeats,
            "channels_last": channels_last,
            "transforms": "native kernel" if native else "compiled" if fused else "eager",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "summary": summary}


def format_winograd_table(report: dict) -> str:
    header = f"{'section':<12} {'shape':<28} {'count':>5} {'conv2d ms':>10} {'winograd ms':>12} {'tile':<16} " \
             f"{'speedup':>8} {'max rel err':>11}"
    lines = [header, "-" * len(header)]
    for r in report["rows"]:
        lines.append(f"{r['section']:<12} {r['shape']:<28} {r['count']:>5} {r['conv2d_ms']:>10.2f} "
                     f"{r['winograd_ms']:>12.2f} {r['tile']:<16} {r['speedup']:>7.2f}x {r['max_rel_err']:>11.1e}")
    s = report["summary"]
    parts = []
    for label, summed_key, whole_key, err_key in (("UNet", "unet_speedup", "unet_step", "unet_output_rel_err"),
                                                  ("VAE decoder", "vae_decoder_speedup", "vae_decode",
                                                   "vae_output_rel_err")):
        if summed_key in s:
            times = s[f"{whole_key}_s"]
            parts.append(f"{label}: convs summed {s[summed_key]:.2f}x, whole module {s[f'{whole_key}_speedup']:.2f}x "
                         f"({times['conv2d']:.2f}s -> {times['winograd']:.2f}s), output rel err {s[err_key]:.1e}")
            if "winograd_kept_filters" in times:
                parts.append(f"{label} with the filter budget given out: {s[f'{whole_key}_speedup_kept_filters']:.2f}x "
                             f"({times['winograd_kept_filters']:.2f}s)")
            other = s.get("pytorch_kernel", {})
            if f"{whole_key}_s" in other:
                parts.append(f"{label} with the PyTorch Winograd: {other[f'{whole_key}_speedup']:.2f}x "
                             f"({other[f'{whole_key}_s']:.2f}s)")
    lines.extend(parts)
    if "pytorch_kernel" in s:
        lines.append(f"memory held: native {s['filter_cache_mb']:.0f} MB of filters + {s.get('scratch_mb', 0):.0f} MB "
                     f"scratch; PyTorch Winograd {s['pytorch_kernel']['filter_cache_mb']:.0f} MB of filters + "
                     f"{s['pytorch_kernel']['scratch_mb']:.0f} MB scratch")
    for section, variants in s.get("profile", {}).items():
        for variant, ops in variants.items():
            lines.append(f"profile {section}, {variant}: " + ", ".join(
                f"{op['op']} {op['share']:.0%} ({op['self_ms']:.0f} ms/{op['calls']})" for op in ops))
    lines.append(f"max rel err per shape {s['max_rel_err']:.1e}; filter cache {s['filter_cache_mb']:.0f} MB; "
                 f"{report['family']} {report['size']}x{report['size']} batch {report['batch']}, "
                 f"{'NHWC' if report.get('channels_last') else 'NCHW'}, {report.get('transforms', 'eager')} "
                 f"transforms, {report['machine'].get('cpu')} ({report['machine'].get('torch_threads')} threads)")
    return "\n".join(lines)
