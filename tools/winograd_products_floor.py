"""How close the native Winograd kernel is to its own floor: the batched products alone, per SD 1.5 UNet layer.

A Winograd F(m,3) convolution is input transform, A*A independent matrix products [tiles x C] x [C x K] (A = m+2),
and output transform. For each 3x3 stride-1 layer shape of SD 1.5's UNet at 512x512 (CFG batch 2) this times,
side by side in one process after a warm-up: PyTorch's direct convolution (fp32), the native kernel with each
tile and work split the calibration tries (filters stored), and the same products alone as one `torch.bmm` (the
kernel's floor if its transforms cost nothing). "products share" near 100% means the transforms are hidden and
only fewer multiplies (a larger tile, narrower types) would go further; GFLOP/s are counted multiplies-adds x 2.

    .venv/bin/python tools/winograd_products_floor.py --json results/winograd-products-floor-sd15-512.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from sdaccel.optim.bench.timing import median_seconds

SHAPES = [  # (N, C, K, H=W): every distinct 3x3 stride-1 convolution of SD 1.5's UNet at 512x512, CFG batch 2
    (2, 320, 320, 64), (2, 640, 320, 64), (2, 960, 320, 64), (2, 640, 640, 64),
    (2, 320, 640, 32), (2, 640, 640, 32), (2, 960, 640, 32), (2, 1280, 640, 32), (2, 1920, 640, 32),
    (2, 1280, 1280, 32),
    (2, 640, 1280, 16), (2, 1280, 1280, 16), (2, 1920, 1280, 16), (2, 2560, 1280, 16),
    (2, 1280, 1280, 8), (2, 2560, 1280, 8),
]
SPLITS = [(split, block) for split in ("t", "k") for block in (16, 32, 64)]


def layer_row(ops, shape: tuple, repeats: int) -> dict:
    from sdaccel.cpukernels.calibrate import native_tiles

    n, c, k, side = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, side, side, generator=gen)
    weight = torch.randn(k, c, 3, 3, generator=gen) / (3 * c**0.5)
    bias = torch.randn(k, generator=gen)
    direct_flop = 2 * n * side * side * k * c * 9
    direct = median_seconds(lambda: F.conv2d(x, weight, bias, padding=1), repeats)
    row = {"shape": [n, c, k, side, side], "direct_ms": direct * 1e3, "direct_gflops": direct_flop / direct / 1e9,
           "tiles": {}}
    for m in native_tiles(side, side):
        filters = ops.transform_filters(weight, m, False)
        kernel = min((median_seconds(lambda s=split, b=block: ops.conv2d(x, filters, bias, m, 1, b, False, s == "k"),
                                     repeats), f"{split}{block}") for split, block in SPLITS)
        a, tiles = m + 2, n * ((side + m - 1) // m) ** 2
        v = torch.randn(a * a, tiles, c, generator=gen)
        u = filters.view(a * a, c, k)
        products = median_seconds(lambda: torch.bmm(v, u), repeats)
        product_flop = 2 * a * a * tiles * c * k
        row["tiles"][f"F{m}"] = {
            "kernel_ms": kernel[0] * 1e3, "split": kernel[1], "speedup_vs_direct": direct / kernel[0],
            "products_ms": products * 1e3, "products_share": products / kernel[0],
            "products_gflops": product_flop / products / 1e9}
        ops.release_scratch()
    return row


def _format(row: dict) -> str:
    n, c, k, side, _ = row["shape"]
    head = f"{n}x{c}x{side}x{side} -> {k}: direct {row['direct_ms']:.1f} ms ({row['direct_gflops']:.0f} GFLOP/s)"
    cells = [f"{name}: kernel {t['kernel_ms']:.1f} ms ({t['speedup_vs_direct']:.2f}x, {t['split']}), products "
             f"{t['products_ms']:.1f} ms ({t['products_gflops']:.0f} GFLOP/s, {t['products_share']:.0%} of the kernel)"
             for name, t in row["tiles"].items()]
    return head + "\n  " + "\n  ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from sdaccel.cpukernels.native import native_ops
    from sdaccel.optim.run.allocator import keep_freed_memory
    from sdaccel.optim.run.capabilities import machine_summary

    keep_freed_memory()  # as bench does: no page faults inside the timings
    ops = native_ops(build=True)
    if ops is None:
        raise SystemExit("the native Winograd kernel is not available here (see python -m sdaccel bench winograd)")
    machine = machine_summary()
    print(machine)
    rows = []
    with torch.inference_mode():
        for shape in SHAPES:
            rows.append(layer_row(ops, shape, args.repeats))
            print(_format(rows[-1]), flush=True)
    total_direct = sum(r["direct_ms"] for r in rows)
    total_best = sum(min(t["kernel_ms"] for t in r["tiles"].values()) for r in rows)
    total_floor = sum(min(t["products_ms"] for t in r["tiles"].values()) for r in rows)
    summary = {"direct_ms": total_direct, "best_kernel_ms": total_best, "best_products_ms": total_floor,
               "kernel_speedup": total_direct / total_best, "products_speedup": total_direct / total_floor}
    print(f"one of each shape: direct {total_direct:.0f} ms, best kernel {total_best:.0f} ms "
          f"({summary['kernel_speedup']:.2f}x), products alone {total_floor:.0f} ms "
          f"({summary['products_speedup']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "summary": summary,
                                         "layers": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
