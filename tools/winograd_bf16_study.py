"""Would Winograd with bf16 products stack on the bf16 gain? Per-layer time and error on SD 1.5's 512x512 shapes.

For each 3x3 layer shape of the UNet (CFG batch 2) and the VAE decoder (batch 1) it times, side by side in one
process after a warm-up, PyTorch's direct convolution in fp32 and in bf16 (what the `bf16` preset runs) against
the native Winograd kernel with fp32 products and with bf16 products (transforms in fp32, the kernel's filters
kept), each tile and work split the calibration would try, and with bf16 products F(2,3) on every shape too (the
one tile whose transforms keep bf16's accuracy); and it measures each one's error against a float64
convolution of the same input. Prints a table and writes it as JSON.

    .venv/bin/python tools/winograd_bf16_study.py --json results/winograd-bf16-study.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from sdaccel.optim.bench.timing import median_seconds


SHAPES = [  # (where, N, C, K, H, W) at 512x512
    ("unet 64x64", 2, 320, 320, 64, 64),
    ("unet 32x32", 2, 640, 640, 32, 32),
    ("unet 16x16", 2, 1280, 1280, 16, 16),
    ("unet 8x8", 2, 1280, 1280, 8, 8),
    ("vae 64x64", 1, 512, 512, 64, 64),
    ("vae 128x128", 1, 512, 512, 128, 128),
    ("vae 256x256", 1, 256, 256, 256, 256),
    ("vae 512x512", 1, 128, 128, 512, 512),
]
SPLITS = ((32, False), (32, True))  # (block, by_channels) as the calibration screens them


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def study(repeats: int) -> list[dict]:
    from sdaccel.cpukernels.calibrate import native_tiles
    from sdaccel.cpukernels.native import native_ops

    ops = native_ops(build=True)
    if ops is None:
        raise SystemExit("the native Winograd kernel is not available here (see python -m sdaccel bench winograd)")
    rows = []
    for where, n, c, k, h, w in SHAPES:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, h, w, generator=gen)
        weight = torch.randn(k, c, 3, 3, generator=gen) / (3 * c**0.5)
        ref = F.conv2d(x.double(), weight.double(), padding=1)
        xb, wb = x.bfloat16(), weight.bfloat16()
        row = {"layer": where, "shape": [n, c, k, h, w]}
        with torch.inference_mode():
            row["fp32 direct"] = (median_seconds(lambda: F.conv2d(x, weight, padding=1), repeats),
                                  _error(F.conv2d(x, weight, padding=1), ref))
            row["bf16 direct"] = (median_seconds(lambda: F.conv2d(xb, wb, padding=1), repeats),
                                  _error(F.conv2d(xb, wb, padding=1), ref))
            for bf16 in (False, True):
                for m in sorted({2, *native_tiles(h, w)}) if bf16 else native_tiles(h, w):
                    filters = ops.transform_filters(weight, m, bf16)
                    best = None
                    for block, by_channels in SPLITS:
                        def call(f=filters, m=m, block=block, by_channels=by_channels):
                            return ops.conv2d(x, f, None, m, 1, block, bf16, by_channels)
                        t = median_seconds(call, repeats)
                        if best is None or t < best[0]:
                            best = (t, _error(call(), ref), block, by_channels)
                    row[f"winograd F{m} {'bf16' if bf16 else 'fp32'} products"] = best[:2]
                    if bf16:  # in a bf16 pipeline the layer's input and output are bf16: the conversions too
                        def converted(f=filters, m=m, block=best[2], by_channels=best[3]):
                            return ops.conv2d(xb.float(), f, None, m, 1, block, True, by_channels).bfloat16()
                        row[f"winograd F{m} bf16 products, bf16 in/out"] = (median_seconds(converted, repeats), best[1])
            ops.release_scratch()
        rows.append(row)
        print(_format(row), flush=True)
    return rows


def _format(row: dict) -> str:
    base = row["bf16 direct"][0]
    cells = [f"{name}: {t * 1e3:.1f} ms ({base / t:.2f}x of bf16, err {e:.1e})"
             for name, value in row.items() if name not in ("layer", "shape") for t, e in [value]]
    return f"{row['layer']} {row['shape']}\n  " + "\n  ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from sdaccel.optim.run.capabilities import machine_summary

    machine = machine_summary()
    print(machine)
    rows = study(args.repeats)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "torch": torch.__version__,
                                         "python": platform.python_version(), "repeats": args.repeats,
                                         "times_s_and_max_relative_error": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
