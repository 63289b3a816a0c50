"""Can Winograd F(2,3) inside an OpenVINO bf16 graph beat OpenVINO's own bf16 convolution? Per layer and per step.

At native precision (bf16 where the CPU has it) OpenVINO already runs SD 1.5's UNet and VAE at 75-91% of this
machine's bf16 peak, level with optimum-intel, so only fewer multiplies could put a recipe ahead. F(2,3) is the
one Winograd tile that keeps bf16's accuracy (its transforms hold only 0, +-1 and 1/2), and it needs 2.25x fewer
products. OpenVINO has no Winograd convolution of its own, so this writes F(2,3) as ordinary graph operations (pad,
strided slices, the separable input transform as adds, one batched MatMul against the transformed filters, the
separable output transform, an interleave) and converts it the way SDAccel's OpenVINO engine converts a model
(trace, static shapes, the precision OpenVINO picks). Two measurements in one process after a warm-up:
- per layer, for a selection of SD 1.5's 3x3 shapes at 512x512 (one variant timed after the other): `F.conv2d`
  against F(2,3), each one's max error against a float64 convolution;
- per UNet step (`--unet-step`): SD 1.5's whole UNet (random weights, CFG batch 2) traced as is and traced with
  its 3x3 convolutions of at least `--min-channels` channels in and out as F(2,3), the two compiled models called
  in turn, each one's max error against the eager fp32 UNet.

    .venv/bin/python tools/openvino_winograd_study.py --unet-step --step-repeats 12 \
        --json results/openvino-winograd-study-sd15-512.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from sdaccel.cpukernels.winograd import conv_padding, filter_transform, is_eligible
from sdaccel.optim.bench.timing import median_seconds

SHAPES = [  # (where, N, C, K, H=W): SD 1.5 at 512x512; the UNet's CFG batch of 2, the VAE decoder's batch of 1
    ("unet", 2, 320, 320, 64), ("unet", 2, 640, 640, 64), ("unet", 2, 640, 640, 32), ("unet", 2, 1920, 640, 32),
    ("unet", 2, 1280, 1280, 32), ("unet", 2, 1280, 1280, 16), ("unet", 2, 2560, 1280, 16),
    ("unet", 2, 1280, 1280, 8), ("vae", 1, 512, 512, 64), ("vae", 1, 512, 512, 128), ("vae", 1, 256, 256, 256),
    ("vae", 1, 128, 128, 512),
]

def transform_filters(weight: torch.Tensor) -> torch.Tensor:
    """[K, C, 3, 3] -> the 16 F(2,3) filter matrices [16, C, K]: the kernels' own `filter_transform`, in float64,
    laid out for `tiles @ filters`."""
    return filter_transform(weight.detach().double(), 2).transpose(1, 2).contiguous().to(weight.dtype)


def _input_transform(d: list) -> list:
    """B^T along one axis: four views shifted by one in, four transformed ones out."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _output_transform(m: list) -> list:
    """A^T along one axis: four products in, two outputs out."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def winograd_f23(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3, stride-1, padding-1 convolution of x [N, C, H, W] (even H and W) with `transform_filters`' output."""
    n, c, h, w = x.shape
    th, tw = h // 2, w // 2
    padded = F.pad(x, (1, 1, 1, 1))
    by_rows = _input_transform([padded[:, :, i:i + 2 * th:2, :] for i in range(4)])
    tiles = [v for u in by_rows for v in _input_transform([u[:, :, :, j:j + 2 * tw:2] for j in range(4)])]
    tiles = torch.stack(tiles, 0).permute(0, 1, 3, 4, 2).reshape(16, n * th * tw, c)
    products = torch.bmm(tiles, filters)  # [16, tiles, K]
    k = products.shape[-1]
    products = products.view(4, 4, n, th, tw, k)
    by_rows = _output_transform([products[i] for i in range(4)])  # 2 x [4, N, th, tw, K]
    out = [_output_transform([r[j] for j in range(4)]) for r in by_rows]  # out[a][b]: [N, th, tw, K]
    out = torch.stack([torch.stack(pair, 0) for pair in out], 0)  # [2, 2, N, th, tw, K]
    out = out.permute(2, 5, 3, 0, 4, 1).reshape(n, k, h, w)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


class _GraphWinograd(torch.nn.Module):
    """One convolution as F(2,3) graph operations."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.filters = torch.nn.Parameter(transform_filters(weight), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        return winograd_f23(x, self.filters, self.bias)


class _Direct(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=1)


def _compiled(module: torch.nn.Module, inputs: tuple):
    """The way SDAccel's OpenVINO engine builds a model: trace, convert with static shapes, default precision."""
    from sdaccel.optim.units.compile.telemetry import import_openvino, no_telemetry

    ov = import_openvino()
    with no_telemetry(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, inputs, check_trace=False, strict=False)
        converted = ov.convert_model(traced, example_input=inputs,
                                     input=[ov.PartialShape(list(t.shape)) for t in inputs])
        return ov.Core().compile_model(converted, "CPU", {})


def _precision(compiled) -> str:
    return str(compiled.get_property("INFERENCE_PRECISION_HINT"))


def layer_row(where: str, shape: tuple, repeats: int) -> dict:
    n, c, k, side = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, side, side, generator=gen)
    weight = torch.randn(k, c, 3, 3, generator=gen) / (3 * c**0.5)
    bias = torch.randn(k, generator=gen) * 0.1
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    arrays = [x.numpy()]
    row = {"layer": f"{where} {side}x{side}", "shape": [n, c, k, side, side]}
    variants = (("openvino direct", _Direct(weight, bias)), ("openvino F(2,3)", _GraphWinograd(weight, bias)))
    for name, module in variants:
        compiled = _compiled(module, (x,))
        out = torch.from_numpy(compiled(arrays)[0]).double()
        row[name] = {"ms": median_seconds(lambda: compiled(arrays), repeats) * 1e3,
                     "max_rel_error": float((out - ref).abs().max() / ref.abs().max()),
                     "precision": _precision(compiled)}
    row["f23_speedup"] = row["openvino direct"]["ms"] / row["openvino F(2,3)"]["ms"]
    return row


def _wide_convolutions(unet: torch.nn.Module, min_channels: int) -> list:
    """Plain convolutions the project's Winograd could take, padding 1 (what `winograd_f23` computes), wide enough."""
    return [m for m in unet.modules() if type(m) is torch.nn.Conv2d and is_eligible(m) and conv_padding(m) == 1
            and min(m.in_channels, m.out_channels) >= min_channels]


class _UnetCall(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context):
        return self.unet(sample, timestep, context, return_dict=False)[0]


def unet_step(size: int, min_channels: int, repeats: int) -> dict:
    """SD 1.5's UNet step in OpenVINO as is and with its wide 3x3 convolutions as F(2,3), called in turn."""
    from sdaccel.optim.testing.random_weights import build_pipeline

    unet = build_pipeline("sd15").unet.eval()
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, size // 8, size // 8, generator=gen), torch.tensor([500.0, 500.0]),
              torch.randn(2, 77, 768, generator=gen))
    arrays = [t.numpy() for t in inputs]
    with torch.no_grad():
        reference = unet(*inputs).sample.double()
    models, row = {}, {"size": size, "min_channels": min_channels, "repeats": repeats}
    for name, convs in (("direct", []), ("F(2,3)", _wide_convolutions(unet, min_channels))):
        for conv in convs:  # the trace records F(2,3) for these; the instance forwards go again right after
            conv.forward = lambda x, conv=conv, f=transform_filters(conv.weight): winograd_f23(x, f, conv.bias)
        try:
            models[name] = _compiled(_UnetCall(unet), inputs)
        finally:
            for conv in convs:
                del conv.forward
        out = torch.from_numpy(models[name](arrays)[0]).double()
        row[name] = {"convolutions_as_f23": len(convs),
                     "max_rel_error_vs_fp32": float((out - reference).abs().max() / reference.abs().max()),
                     "precision": _precision(models[name])}
    times = {name: [] for name in models}
    for _ in range(repeats):  # in turn, so drift on a shared machine hits both alike
        for name, model in models.items():
            start = time.perf_counter()
            model(arrays)
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        row[name].update(median_s=statistics.median(ts), min_s=min(ts), max_s=max(ts))
    row["f23_speedup"] = row["direct"]["median_s"] / row["F(2,3)"]["median_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--unet-step", action="store_true", help="also time the whole UNet step")
    parser.add_argument("--size", type=int, default=512, help="--unet-step: image side")
    parser.add_argument("--min-channels", type=int, default=640, help="--unet-step: which convolutions F(2,3) takes")
    parser.add_argument("--step-repeats", type=int, default=10, help="--unet-step: calls of each model, in turn")
    args = parser.parse_args()
    from sdaccel.optim.run.capabilities import machine_summary

    machine = machine_summary()
    print(machine)
    rows = []
    for where, *shape in SHAPES:
        row = layer_row(where, tuple(shape), args.repeats)
        rows.append(row)
        d, w = row["openvino direct"], row["openvino F(2,3)"]
        print(f"{row['layer']} {row['shape']}: direct {d['ms']:.1f} ms (err {d['max_rel_error']:.1e}), "
              f"F(2,3) {w['ms']:.1f} ms (err {w['max_rel_error']:.1e}), {row['f23_speedup']:.2f}x "
              f"[{d['precision']}]", flush=True)
    summary = {part: {"direct_ms": sum(r["openvino direct"]["ms"] for r in rows if r["layer"].startswith(part)),
                      "f23_ms": sum(r["openvino F(2,3)"]["ms"] for r in rows if r["layer"].startswith(part))}
               for part in ("unet", "vae")}
    for part, s in summary.items():
        s["f23_speedup"] = s["direct_ms"] / s["f23_ms"]
        print(f"{part}: one call of each shape, direct {s['direct_ms']:.0f} ms, F(2,3) {s['f23_ms']:.0f} ms "
              f"({s['f23_speedup']:.2f}x)")
    step = None
    if args.unet_step:
        step = unet_step(args.size, args.min_channels, args.step_repeats)
        d, w = step["direct"], step["F(2,3)"]
        print(f"UNet step {args.size}x{args.size}, CFG batch 2: direct {d['median_s']:.3f} s ({d['min_s']:.3f}-"
              f"{d['max_s']:.3f}), {w['convolutions_as_f23']} convolutions as F(2,3) {w['median_s']:.3f} s "
              f"({w['min_s']:.3f}-{w['max_s']:.3f}): {step['f23_speedup']:.3f}x; error vs fp32 "
              f"{d['max_rel_error_vs_fp32']:.2e} / {w['max_rel_error_vs_fp32']:.2e} [{d['precision']}]")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "summary": summary,
                                         "layers": rows, "unet_step": step}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
