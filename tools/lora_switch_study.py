"""What a LoRA costs in the engine: the time to merge, switch and remove one on the real SD 1.5 architecture
(random weights), with and without a unit that must re-apply on the merged weights (Winograd), and the time per
denoising step with the LoRA merged against without (merged weights: the same work), and with `--compile` what a
switch costs a compiled UNet (the graph bakes the weights in, so the first run after a switch compiles again:
that run's compile time is the switch's cost). Side by side in one process after a warm-up; prints a table and
writes it as JSON.

    .venv/bin/python tools/lora_switch_study.py --compile openvino,inductor --json results/lora-switch-sd15.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from sdaccel.optim.run.cache import PipelineCache
from sdaccel.optim.run.capabilities import machine_summary
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec.lora import LoraRef
from sdaccel.optim.spec.model_ref import ModelRef
from sdaccel.optim.spec.optimization import config_class
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.testing import enable_synthetic
from sdaccel.optim.testing.lora import random_lora


def _prepare_s(cache, spec) -> float:
    start = time.perf_counter()
    cache.prepare(spec)
    return time.perf_counter() - start


def _compiled_switch(cache, base, files, backend: str, size: int) -> dict:
    """Seconds a LoRA change costs a UNet compiled by `backend`: the cache's prepare (restore, merge, re-apply)
    plus the compile time of the first run after it (the graph is built again from the merged weights)."""
    fields = {"backend": backend} | ({"freezing": True} if backend == "inductor" else {})
    plain = base.with_(optimizations=(config_class("compile")(**fields),))
    request = GenerationRequest(prompt="a lighthouse", width=size, height=size, steps=1, seed=1)

    def change(spec) -> float:
        prepare_s = _prepare_s(cache, spec)
        stats = run(spec, request, cache=cache).stats
        return round(prepare_s + float(stats.counters.get("compile_s", 0.0)), 2)

    row = {"first_compile_s": change(plain)}
    start = time.perf_counter()
    warm = run(plain, request, cache=cache).stats
    row["warm_run_s"] = round(time.perf_counter() - start, 2)
    assert not warm.counters.get("compile_s"), f"{backend}: a warm run compiled again"
    row["merge_s"] = change(plain.with_(loras=(LoraRef(str(files[0]), 0.8),)))
    row["switch_s"] = change(plain.with_(loras=(LoraRef(str(files[1]), 0.6),)))
    row["remove_s"] = change(plain)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", default="", help="compile backends to time a switch under (openvino,inductor)")
    parser.add_argument("--compile-size", type=int, default=256, help="image side of the compiled runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    enable_synthetic()
    cache = PipelineCache(max_entries=1)
    base = PipelineSpec(model=ModelRef.synthetic("sd15"), device="cpu")
    prepared = cache.prepare(base)
    folder = Path(tempfile.mkdtemp(prefix="sdaccel-lora-study-"))
    files = [random_lora(prepared.pipe, folder / f"style{i}.safetensors", rank=args.rank, seed=i) for i in (1, 2)]
    rows = {}

    def switches(optimizations=()):
        plain = base.with_(optimizations=optimizations)
        cache.prepare(plain)
        times = {"merge": [], "switch": [], "remove": []}
        for _ in range(args.repeats):
            times["merge"].append(_prepare_s(cache, plain.with_(loras=(LoraRef(str(files[0]), 0.8),))))
            times["switch"].append(_prepare_s(cache, plain.with_(loras=(LoraRef(str(files[1]), 0.6),))))
            times["remove"].append(_prepare_s(cache, plain))
        return {k: round(statistics.median(v), 3) for k, v in times.items()} | \
            {f"{k}_spread": [round(min(v), 3), round(max(v), 3)] for k, v in times.items()}

    rows["no units"] = switches()
    winograd = (config_class("winograd")(vae=False),)
    run(base.with_(optimizations=winograd), GenerationRequest(prompt="warm", width=64, height=64, steps=1),
        cache=cache)  # its calibration, once, outside the timings
    rows["winograd (re-applied on the merged weights)"] = switches(winograd)

    compiled = {backend: _compiled_switch(cache, base, files, backend, args.compile_size)
                for backend in filter(None, args.compile.split(","))}

    request = GenerationRequest(prompt="a lighthouse", width=args.size, height=args.size, steps=args.steps, seed=1)
    per_step = {}
    for label, spec in (("without", base), ("with", base.with_(loras=(LoraRef(str(files[0]), 0.8),)))):
        run(spec, request.with_(steps=1), cache=cache)  # warm-up
        per_step[label] = []
    for _ in range(args.repeats):  # alternating, so a drift of the machine hits both
        for label, spec in (("without", base), ("with", base.with_(loras=(LoraRef(str(files[0]), 0.8),)))):
            stats = run(spec, request, cache=cache).stats
            per_step[label].append(stats.stage_s["denoise"] / args.steps)
    step = {label: round(statistics.median(v), 3) for label, v in per_step.items()}
    lines = [f"LoRA rank {args.rank} over the UNet's 3x3 resnet convolutions and attention q/out projections and the "
             f"text encoder's (kohya format); {args.repeats} repeats after a warm-up; {machine_summary().get('cpu')}",
             f"{'units':<46} {'merge s':>8} {'switch s':>9} {'remove s':>9}"]
    for label, row in rows.items():
        lines.append(f"{label:<46} {row['merge']:>8.3f} {row['switch']:>9.3f} {row['remove']:>9.3f}")
    lines.append(f"denoise per step at {args.size}x{args.size}: without {step['without']:.2f} s, with the LoRA merged "
                 f"{step['with']:.2f} s ({step['with'] / step['without']:.3f}x)")
    for backend, row in compiled.items():
        lines.append(f"compile {backend} at {args.compile_size}x{args.compile_size}, one step: first compile "
                     f"{row['first_compile_s']:.1f} s; LoRA merged {row['merge_s']:.1f} s, switched "
                     f"{row['switch_s']:.1f} s, removed {row['remove_s']:.1f} s (prepare + the next run's compile); "
                     f"a warm run {row['warm_run_s']:.2f} s")
    print("\n".join(lines))
    if args.json:
        report = {"machine": machine_summary(), "rank": args.rank, "size": args.size, "steps": args.steps,
                  "repeats": args.repeats, "switch_s": rows, "compiled_switch_s": compiled,
                  "compile_size": args.compile_size, "denoise_per_step_s": step,
                  "denoise_per_step_runs_s": per_step, "table": lines}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
