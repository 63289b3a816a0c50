"""The roofline column: how close a bench row's UNet steps and VAE decode come to what this machine can compute.

Two numbers per machine, measured once and kept in the SDAccel cache folder: the fp32 and (where the CPU has
native bf16) bf16 peak, the best of a large matrix product and a large 3x3 convolution. Two per model and size,
counted rather than timed: the floating-point operations of one UNet sample and of one VAE decode, from
PyTorch's FLOP counter run on a copy of the architecture on the meta device (no memory, no compute). A row's
"effective" GFLOP/s is the full models' work divided by its stage time, so a row that skips work (Winograd's
fewer multiplications, DeepCache, the CFG cutoff) can show more than the peak: that is the point of it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from ..run.files import atomic_path
from .timing import timed_runs


MEASUREMENT = "roofline-v1"


def _best_rate(fn, flops: float, repeats: int = 5) -> float:
    return flops / min(timed_runs(fn, repeats)) / 1e9


def measure_peaks(bf16: bool) -> dict:
    """GFLOP/s of a 2048^3 matrix product and a 256-channel 3x3 convolution on a 64x64 map, fp32 (and bf16)."""
    found = {}
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if bf16 else [])
    with torch.inference_mode():
        for name, dtype in dtypes:
            a = torch.randn(2048, 2048).to(dtype)
            b = torch.randn(2048, 2048).to(dtype)
            mm = _best_rate(lambda: torch.mm(a, b), 2 * 2048 ** 3)
            x = torch.randn(2, 256, 64, 64).to(dtype)
            w = torch.randn(256, 256, 3, 3).to(dtype)
            conv = _best_rate(lambda: F.conv2d(x, w, padding=1), 2 * 9 * 256 * 256 * 64 * 64 * 2)
            found[name] = {"matmul_gflops": round(mm, 1), "conv3x3_gflops": round(conv, 1),
                           "peak_gflops": round(max(mm, conv), 1)}
    return found


def machine_peaks(cache_dir: Path | None = None) -> dict:
    """This machine's peaks, measured once (a few seconds) and kept per CPU, torch version and thread count."""
    from ...cpukernels.calibrate import machine_key
    from ...cpukernels.paths import default_cache_dir
    from ..run.capabilities import cpu_has_native

    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    path = folder / f"roofline-{machine_key()}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("measurement") == MEASUREMENT:
            return data["peaks"]
    except (OSError, ValueError, KeyError):
        pass
    peaks = measure_peaks(cpu_has_native("bfloat16"))
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"measurement": MEASUREMENT, "peaks": peaks}), encoding="utf-8")
    return peaks


def count_flops(module_cls, config, call) -> float:
    """FLOPs of `call(module)` on a meta-device copy of a diffusers model built from its config."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        module = module_cls.from_config(config)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            call(module)
    return float(counter.get_total_flops())


def model_flops(pipe, size: int) -> dict:
    """FLOPs of one UNet sample (batch 1, one text context) and of one VAE decode at `size` x `size`."""
    unet, vae = pipe.unet, pipe.vae
    lat = size // 8
    context = unet.config.cross_attention_dim
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embeds + 6 time ids (refiner: 5)
        width = unet.add_embedding.linear_1.in_features
        ids = 5 if width - 5 * unet.config.addition_time_embed_dim in (1280, 768) and width != 2816 else 6
        added = {"text_embeds": torch.zeros(1, width - ids * unet.config.addition_time_embed_dim, device="meta"),
                 "time_ids": torch.zeros(1, ids, device="meta")}

    def unet_call(module):
        module(torch.zeros(1, unet.config.in_channels, lat, lat, device="meta"), torch.tensor([500], device="meta"),
               encoder_hidden_states=torch.zeros(1, 77, context, device="meta"), added_cond_kwargs=added)

    def vae_call(module):
        latent = torch.zeros(1, getattr(module.config, "latent_channels", 4), lat, lat, device="meta")
        module.decode(latent)

    flops = {"unet_sample": count_flops(type(unet), unet.config, unet_call)}
    vae_cls = type(vae)
    flops["vae_decode"] = count_flops(vae_cls, vae.config, vae_call)
    return flops


def roofline_columns(row: dict, stats_list: list, flops: dict, peaks: dict) -> dict:
    """Effective GFLOP/s of the row's denoise and decode stages and their share of the fp32 / bf16 peaks."""
    denoise = statistics.median(s.stage_s.get("denoise", 0.0) for s in stats_list)
    decode = statistics.median(s.stage_s.get("decode", 0.0) for s in stats_list)
    samples = statistics.median(sum(s.unet_batch_sizes) or s.unet_calls for s in stats_list)
    out = {}
    for label, work, seconds in (("unet", flops["unet_sample"] * samples, denoise),
                                 ("vae", flops["vae_decode"], decode)):
        if seconds <= 0 or work <= 0:
            continue
        rate = work / seconds / 1e9
        entry = {"gflops": round(rate, 1), "work_gflop": round(work / 1e9, 1)}
        for dtype, peak in peaks.items():
            entry[f"of_{dtype}_peak"] = round(rate / peak["peak_gflops"], 3)
        out[label] = entry
    return out
