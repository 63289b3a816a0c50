"""`python -m sdaccel`: generate images and run benchmarks from a terminal.

Request flags are generated from the GenerationRequest field descriptions (the same ones the
ComfyUI and gradio front-ends read); bad input exits non-zero with the engine's message.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from .spec.errors import ConfigError, SDAccelError
from .spec.fields import describe, parse_text

log = logging.getLogger(__name__)

# CLI spellings the issue tracker and A1111 users expect for some request fields.
_FLAG_ALIASES = {"negative_prompt": ["--negative"], "batch_size": ["--batch"]}


def add_config_arguments(parser: argparse.ArgumentParser, cls, *, skip=(), prefix: str = "") -> None:
    """One flag per described field of `cls` (type, choices, help from its FieldInfo)."""
    for info in describe(cls):
        if not info.ui or info.name in skip:
            continue
        flag = "--" + prefix + info.name.replace("_", "-")
        names = [flag] + (_FLAG_ALIASES.get(info.name, []) if not prefix else [])
        kwargs: dict = {"dest": prefix.replace("-", "_") + info.name, "default": None, "help": info.tooltip}
        if info.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = info.kind if info.kind in (int, float, str) else str
            if info.choices:
                kwargs["choices"] = info.choices
        parser.add_argument(*names, **kwargs)


def config_from_args(cls, args: argparse.Namespace, *, prefix: str = "", **extra):
    values = {}
    for info in describe(cls):
        value = getattr(args, prefix.replace("-", "_") + info.name, None)
        if value is not None:
            values[info.name] = value
    values.update(extra)
    return cls(**values)


def parse_opt(text: str):
    """`kind` or `kind:field=value,field=value` -> an optimization config."""
    from .spec.optimization import config_class

    kind, _, body = text.partition(":")
    cls = config_class(kind.strip().replace("-", "_"))
    fields = {f.name: f for f in describe(cls)}
    values = {}
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, sep, raw = item.partition("=")
        info = fields.get(key.strip())
        if info is None:
            raise ConfigError(f"--opt {text}", f"{cls.kind} has no field {key.strip()!r}",
                              f"fields: {', '.join(fields)}")
        if not sep:
            raise ConfigError(f"--opt {text}", f"{key.strip()!r} has no value", f"write {key.strip()}=VALUE")
        try:
            values[info.name] = parse_text(cls.__name__, info, raw)
        except ConfigError as exc:
            raise ConfigError(f"--opt {text}", str(exc)) from exc
    return cls(**values)


def _build_parser() -> argparse.ArgumentParser:
    from .bench.comfyui import VARIANTS as COMFY_VARIANTS
    from .bench.presets import preset_names
    from .models.families import FAMILIES
    from .plan.planner import QUALITY
    from .spec.ensemble import EnsembleSpec
    from .spec.model_ref import ModelRef
    from .spec.pipeline import GenerationRequest

    parser = argparse.ArgumentParser(prog="python -m sdaccel", description="SDAccel: measured Stable Diffusion "
                                     "acceleration. Generate images or benchmark optimization presets. The web UI "
                                     "and A1111 API: python -m sdaccel webui --help")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a checkpoint and write PNGs")
    gen.add_argument("--checkpoint", required=True, help="checkpoint file, diffusers folder, or synthetic:<family>")
    add_config_arguments(gen, ModelRef, skip=("path",))
    gen.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    add_config_arguments(gen, GenerationRequest)
    gen.add_argument("--init-image", default=None, help="img2img: source image file (PNG/JPEG/WebP)")
    gen.add_argument("--opt", action="append", default=[], metavar="KIND[:FIELD=VALUE,...]",
                     help="add an optimization, e.g. channels_last or precision:unet=fp16 (repeatable)")
    gen.add_argument("--preset", action="append", default=[], help="add a bench preset's optimizations")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                     help="merge a LoRA (kohya/A1111 or diffusers format) at a strength (default 1; repeatable)")
    gen.add_argument("--fit-memory", default=None, metavar="BUDGET", help="add the planner's choice for this memory "
                     "budget (e.g. 6GB): the fastest combination measured on this machine that fits (see `plan`)")
    gen.add_argument("--fit-quality", default="any", choices=tuple(QUALITY),
                     help="with --fit-memory: which lossy parts the plan may use")
    gen.add_argument("--tiny-vae", default="", help="with --fit-memory: a TAESD decoder file, so the plan may decode "
                     "with the Tiny VAE (without one it plans without it)")
    gen.add_argument("--out", required=True, help="folder for the PNG files")
    gen.add_argument("--refiner", default=None, help="SDXL refiner checkpoint: run base + refiner as one schedule "
                     "(the --checkpoint must be an SDXL base)")
    add_config_arguments(gen, EnsembleSpec)

    bench = sub.add_parser("bench", help="benchmark presets side by side on this machine (or `bench winograd`)")
    bench.add_argument("target", nargs="?", default="presets", choices=("presets", "winograd", "comfyui", "stream"),
                       help="presets (default): whole runs per preset; winograd: every 3x3 conv shape, "
                       "F.conv2d vs Winograd; comfyui: the MODEL patches in a real ComfyUI (--comfyui, "
                       "--comfyui-python) against the engine's pipeline with the same toggles; stream: frames per "
                       "second and latency of the stream pipeline against a per-frame diffusers img2img loop")
    bench.add_argument("--family", default=None, choices=sorted(FAMILIES),
                       help="family to build with random weights (default sd15), or an override of what "
                       "--checkpoint is detected as")
    bench.add_argument("--size", type=int, default=512, help="image side in pixels")
    bench.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; bench stream: 2 per "
                       "frame)")
    bench.add_argument("--frames", type=int, default=8, help="bench stream: frames timed per row (after --warmup "
                       "frames, default 3 there)")
    bench.add_argument("--strength", type=float, default=0.5, help="bench stream: img2img strength of each frame")
    bench.add_argument("--streamdiffusion-python", default=None, help="bench stream: the Python of a venv with the "
                       "streamdiffusion package, to run it side by side on the same weights and clip")
    bench.add_argument("--checkpoint", default=None, help="benchmark this checkpoint instead of random weights")
    bench.add_argument("--preset", action="append", default=None,
                       help=f"preset to run (repeatable; combine with +). Known: {', '.join(preset_names())}")
    bench.add_argument("--list-presets", action="store_true", help="list presets and exit")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--batch-size", type=int, default=1)
    bench.add_argument("--cfg", type=float, default=None)
    bench.add_argument("--scheduler", default="auto")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    bench.add_argument("--json", default=None, help="write the report as JSON here")
    bench.add_argument("--chart", default=None, help="draw speedup and memory bars into this PNG (matplotlib)")
    bench.add_argument("--reference", default=None, help="fidelity columns against the baseline images another "
                       "bench run saved (--save-reference) instead of rendering them here")
    bench.add_argument("--save-reference", default=None, help="keep the baseline row's images in this file "
                       "(safetensors) for --reference")
    bench.add_argument("--refiner", default=None, help="SDXL refiner checkpoint for the refiner-ensemble preset "
                       "(random weights when absent)")
    bench.add_argument("--channels-last", action="store_true",
                       help="bench winograd: NHWC activations on both sides (Winograd on top of channels-last)")
    bench.add_argument("--modules", default="unet,vae_decoder",
                       help="bench winograd: which modules to measure (comma-separated: unet, vae_decoder)")
    bench.add_argument("--comfyui", default=None, help="bench comfyui: the ComfyUI checkout to start (127.0.0.1)")
    bench.add_argument("--comfyui-python", default=None, help="bench comfyui: the python of ComfyUI's venv")
    bench.add_argument("--variants", default=None, help="bench comfyui: comma-separated variants (default all: "
                       f"{', '.join(COMFY_VARIANTS)})")
    bench.add_argument("--no-engine", action="store_true", help="bench comfyui: skip the engine's side")
    bench.add_argument("--eager-transforms", action="store_true",
                       help="bench winograd: the eager PyTorch transforms instead of the compiled ones")
    bench.add_argument("--winograd-kernel", default="auto", choices=("auto", "pytorch"),
                       help="bench winograd: the native kernel where it builds (auto) or the PyTorch Winograd")
    bench.add_argument("--optimum", action="store_true",
                       help="also run optimum-intel's OpenVINO pipeline (fp32 and its default precision) on the same "
                            "weights, side by side (needs optimum-intel, here or in --optimum-python)")
    bench.add_argument("--optimum-python", default=None,
                       help="the Python of a venv with optimum-intel installed (for --optimum)")
    bench.add_argument("--compare-pytorch", action="store_true",
                       help="bench winograd: also time the whole modules with the PyTorch Winograd, same process")
    bench.add_argument("--filter-cache-mb", type=int, default=0,
                       help="bench winograd: memory for kept transformed filters (0: the unit's automatic budget)")
    bench.add_argument("--profile", action="store_true",
                       help="bench winograd: where each whole module's time goes (PyTorch profiler, top operations by "
                            "own time), plain, with Winograd, and with the PyTorch Winograd if --compare-pytorch")
    from .stream.cli import add_stream_parser

    add_stream_parser(sub)
    plan = sub.add_parser("plan", help="the fastest measured combination that fits a memory budget on this machine")
    plan.add_argument("--budget", required=True, help="memory to stay within: 6GB, 5.5GB, 5500MB (process RAM on a "
                      "CPU, GPU memory on a GPU)")
    plan.add_argument("--family", default="sd15", choices=sorted(FAMILIES), help="model family (the profile is "
                      "measured on its architecture with random weights: same cost as trained ones)")
    plan.add_argument("--checkpoint", default="", help="measure this checkpoint (its family given by --family) "
                      "instead of the family's architecture with random weights")
    plan.add_argument("--size", type=int, default=512, help="image side in pixels")
    plan.add_argument("--steps", type=int, default=20)
    plan.add_argument("--batch-size", type=int, default=1)
    plan.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    plan.add_argument("--lossless", action="store_true", help="only combinations that keep the baseline's image")
    plan.add_argument("--min-psnr", type=float, default=None, help="only combinations at least this faithful (dB)")
    plan.add_argument("--exclude", action="append", default=[], metavar="PART",
                      help="leave out combinations with this part (e.g. tiny-vae when you have no TAESD file)")
    plan.add_argument("--headroom", type=float, default=0.05, help="share of the budget kept free for run-to-run "
                      "spread (default 0.05)")
    how = plan.add_mutually_exclusive_group()
    how.add_argument("--measure", action="store_true", help="measure the profile again even if a current one is kept")
    how.add_argument("--no-measure", action="store_true", help="fail instead of measuring when no current profile "
                     "is kept")
    how.add_argument("--profile", default=None, help="choose among the rows of this `bench --json` report instead")
    plan.add_argument("--repeats", type=int, default=2, help="timed runs per combination when measuring")
    plan.add_argument("--warmup", type=int, default=1)
    plan.add_argument("--json", default=None, help="write the plan and its profile here")
    return parser


def _check_output_file(path: str | None, flag: str) -> None:
    """Refuse an output file that cannot be written before any work is done."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(flag, f"{target} is a folder", f"name a file, e.g. {target / 'bench.json'}")
    _check_output_folder(target.parent, flag)


def _check_output_folder(folder: Path, flag: str) -> None:
    """The nearest existing ancestor must be a writable folder (nothing is created here)."""
    probe = folder.expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(flag, f"{probe} is a file, not a folder", "choose a path inside a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(flag, f"{probe} is not writable", "choose a folder you can write to")


def _unique_path(folder: Path, stem: str) -> Path:
    path = folder / f"{stem}.png"
    n = 1
    while path.exists():
        path = folder / f"{stem}-{n}.png"
        n += 1
    return path


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from .bench.presets import resolve_preset
    from .spec.ensemble import EnsembleSpec
    from .spec.lora import LoraRef
    from .spec.model_ref import ModelRef
    from .spec.pipeline import GenerationRequest, PipelineSpec

    model = config_from_args(ModelRef, args, path=args.checkpoint)
    spec = PipelineSpec(model=model, device=args.device, loras=tuple(LoraRef.parse(text) for text in args.lora))
    _check_output_folder(Path(args.out), "--out")
    if args.init_image and not Path(args.init_image).expanduser().is_file():
        raise ConfigError("--init-image", f"{args.init_image} is not a file", "give the path of a PNG/JPEG/WebP image")
    extra = {"init_image": args.init_image} if args.init_image else {}
    request = config_from_args(GenerationRequest, args, **extra)
    for name in args.preset:
        spec, request = resolve_preset(name).apply(spec, request)
    for text in args.opt:
        spec = spec.with_optimization(parse_opt(text))
    if args.fit_memory:
        from .plan.budget import parse_budget

        parse_budget(args.fit_memory, field="--fit-memory")
        if args.refiner:
            raise ConfigError("--fit-memory", "plans one model, not the refiner ensemble", "drop --refiner or it")
    elif args.tiny_vae or args.fit_quality != "any":
        raise ConfigError("--tiny-vae/--fit-quality", "only apply with --fit-memory", "add --fit-memory BUDGET")
    if args.refiner:
        refiner = replace(spec, model=ModelRef(path=args.refiner), loras=())  # the base's LoRAs fit the base only
        spec = config_from_args(EnsembleSpec, args, base=spec, refiner=refiner)
    elif args.switch_at is not None:
        raise ConfigError("--switch-at", "applies to the refiner ensemble only", "add --refiner FILE or drop it")
    _quiet_libraries(args.verbose)
    if args.fit_memory:
        from .plan.planner import plan_for

        spec, request, plan, _ = plan_for(spec, request, args.fit_memory, quality=args.fit_quality,
                                          tiny_vae=args.tiny_vae)
        print(f"fit to {args.fit_memory}: {plan.preset} (expected {plan.expected_s:.1f} s, {plan.peak_mb:.0f} MB peak"
              + "".join(f"; {c.part} costs {c.psnr_db:.1f} dB" for c in plan.lossy_parts if c.psnr_db) + ")")
    from .run.infotext import parameters_text, run_metadata, save_png
    from .run.sampler import run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bars: list = []

    def progress(step, total):
        if not bars:  # created on the first step, after any loading messages
            bars.append(tqdm(total=total, desc="denoise", unit="step", leave=False))
        bars[0].n = step
        bars[0].refresh()

    try:
        result = run(spec, request, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    meta = run_metadata(spec, request, result.stats)
    for i, image in enumerate(result.images):
        path = _unique_path(out, f"sdaccel_{(request.seed + i) % 2**64}")
        save_png(image, path, {"parameters": parameters_text(spec, request, result.stats, i), "sdaccel": meta})
        print(path)
    print(result.stats.summary_line())
    return 0


def cmd_bench(args) -> int:
    from .bench.presets import PRESETS, resolve_preset

    if args.list_presets:  # no torch needed to list them
        for name, preset in PRESETS.items():
            print(f"{name:<26} {preset.description}")
        return 0
    _check_output_file(args.json, "--json")
    _check_output_file(args.chart, "--chart")
    _quiet_libraries(args.verbose)
    from .bench.runner import BenchSettings, format_table, run_bench, write_chart, write_report

    if args.target == "winograd":
        from .bench.winograd import format_winograd_table, run_winograd_bench

        report = run_winograd_bench(args.family or "sd15", args.size, repeats=args.repeats,
                                    channels_last=args.channels_last,
                                    fused_transforms=not args.eager_transforms, kernel=args.winograd_kernel,
                                    filter_cache_mb=args.filter_cache_mb, compare_pytorch=args.compare_pytorch,
                                    profile=args.profile,
                                    modules=tuple(m.strip() for m in args.modules.split(",") if m.strip()))
        table = format_winograd_table(report)
        print(table)
        if args.json:
            _wrote(write_report(report, args.json, table,
                                f"bench winograd: {report['family']} {args.size}x{args.size}"))
        return 0
    if args.target == "stream":
        return _bench_stream(args)
    args.steps = args.steps or 20
    if args.target == "comfyui":
        return _bench_comfyui(args)
    settings = BenchSettings(family=args.family, size=args.size, steps=args.steps,
                             presets=args.preset or ["baseline"], repeats=args.repeats, warmup=args.warmup,
                             checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size,
                             seed=args.seed, cfg=args.cfg, scheduler=args.scheduler, refiner=args.refiner,
                             optimum=args.optimum, optimum_python=args.optimum_python,
                             reference_file=args.reference, save_reference_file=args.save_reference)
    for name in settings.presets:  # fail on a typo before loading anything
        resolve_preset(name)
    if args.reference and not Path(args.reference).is_file():
        raise ConfigError("--reference", f"{args.reference} does not exist", "run the baseline with "
                          "--save-reference FILE first")
    _check_output_file(args.save_reference, "--save-reference")
    if args.optimum_python and not args.optimum:
        raise ConfigError("--optimum-python", "only applies with --optimum", "add --optimum or drop it")
    if args.optimum_python and not (Path(args.optimum_python).is_file() and os.access(args.optimum_python, os.X_OK)):
        raise ConfigError("--optimum-python", f"{args.optimum_python} is not an executable Python",
                          "give the python of a venv with optimum-intel installed (VENV/bin/python)")
    report = run_bench(settings)
    table = format_table(report)
    print(table)
    if args.json:
        _wrote(write_report(report, args.json, table, f"bench: {report['settings']['family']} {settings.size}x"
                            f"{settings.size}, {settings.steps} steps"))
    if args.chart:
        print(f"wrote {write_chart(report, args.chart)}")
    return 0


def cmd_plan(args) -> int:
    from .plan.budget import parse_budget
    from .plan.choose import format_plan
    from .plan.planner import make_plan

    parse_budget(args.budget)  # a typo fails before any measuring
    _check_output_file(args.json, "--json")
    _quiet_libraries(args.verbose)
    measure = "always" if args.measure else "never" if args.no_measure else "auto"
    plan, report = make_plan(args.budget, family=args.family, size=args.size, steps=args.steps,
                             batch_size=args.batch_size, device=args.device, lossless=args.lossless,
                             min_psnr_db=args.min_psnr, exclude=tuple(args.exclude), headroom=args.headroom,
                             measure=measure, profile=args.profile, repeats=args.repeats, warmup=args.warmup,
                             model=args.checkpoint)
    print(format_plan(plan, report))
    if args.json:
        from .bench.runner import write_json

        choice = {"preset": plan.preset, "budget_mb": plan.budget_mb, "limit_mb": plan.limit_mb,
                  "expected_s": plan.expected_s, "peak_mb": plan.peak_mb,
                  "lossy_parts": [vars(c) for c in plan.lossy_parts]}
        print(f"wrote {write_json({'plan': choice, 'profile': report}, args.json)}")
    return 0


def _wrote(paths) -> None:
    for path in paths:
        print(f"wrote {path}")


def _bench_comfyui(args) -> int:
    from .bench.comfyui import (
        VARIANTS,
        ComfyBenchSettings,
        format_comfyui_table,
        run_comfyui_bench,
        write_comfyui_chart,
    )
    from .bench.runner import write_report
    from .spec.errors import ConfigError

    if not args.comfyui or not args.comfyui_python:
        raise ConfigError("bench comfyui", "needs --comfyui and --comfyui-python",
                          "give a ComfyUI checkout and its venv's python, e.g. --comfyui ~/ComfyUI "
                          "--comfyui-python ~/ComfyUI/venv/bin/python")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else list(VARIANTS)
    settings = ComfyBenchSettings(comfyui=args.comfyui, python=args.comfyui_python, size=args.size,
                                  steps=args.steps, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                                  cfg=args.cfg if args.cfg is not None else 7.0, variants=variants,
                                  engine=not args.no_engine)
    report = run_comfyui_bench(settings)
    table = format_comfyui_table(report)
    print(table)
    if args.json:
        _wrote(write_report(report, args.json, table, f"bench comfyui: {report.get('family', 'sd15')} "
                            f"{settings.size}x{settings.size}, {settings.steps} steps"))
    if args.chart:
        print(f"wrote {write_comfyui_chart(report, args.chart)}")
    return 0


def _bench_stream(args) -> int:
    from .bench.runner import write_report
    from .bench.stream import LCM_VARIANTS, TURBO_VARIANTS, StreamBenchSettings, format_stream_table, run_stream_bench
    from .models.families import FAMILIES

    family = args.family or "sd-turbo"
    default = TURBO_VARIANTS if FAMILIES[family].turbo else TURBO_VARIANTS + LCM_VARIANTS
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else list(default)
    if args.streamdiffusion_python and "streamdiffusion" not in variants:
        variants.append("streamdiffusion")
    settings = StreamBenchSettings(family=family, size=args.size, steps=args.steps or 2, strength=args.strength,
                                   frames=args.frames, warmup=max(args.warmup, 3), variants=variants,
                                   checkpoint=args.checkpoint, device=args.device,
                                   streamdiffusion_python=args.streamdiffusion_python)
    report = run_stream_bench(settings)
    table = format_stream_table(report)
    print(table)
    if args.json:
        _wrote(write_report(report, args.json, table, f"bench stream: {family} {args.size}x{args.size}"))
    return 0


def _quiet_libraries(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__.rsplit(".", 1)[0]).setLevel(level)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from diffusers.utils import logging as dlog
            from transformers.utils import logging as tlog

            dlog.set_verbosity_error()
            dlog.disable_progress_bar()
            tlog.set_verbosity_error()
        except ImportError:  # pragma: no cover
            pass


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    from .testing import enable_synthetic

    enable_synthetic()  # `synthetic:<family>` checkpoints: the bench's random-weight models
    from .run.allocator import keep_freed_memory

    keep_freed_memory()  # our own process: reuse freed memory (1.4x per CPU step with glibc, see allocator.py)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "stream":
            from .stream.cli import cmd_stream

            return cmd_stream(args)
        return cmd_bench(args)
    except SDAccelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
