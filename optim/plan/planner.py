"""One call for every front-end: find or measure this machine's profile, choose, and apply the choice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..spec.errors import ConfigError
from .budget import parse_budget
from .candidates import candidate_presets, parts_of
from .choose import Plan, choose
from .profile import ProfileKey, load_profile, measure_profile, read_report, stale_reason


def profile_key(family: str, size: int, steps: int, *, batch_size: int = 1, device: str = "auto",
                exclude: tuple = (), model: str = "") -> ProfileKey:
    """The key of the profile for this request on this machine (device resolved, its candidates listed)."""
    from ..run.capabilities import cpu_has_native, resolve_device

    for name, value, low in (("--size", size, 64), ("--steps", steps, 1), ("--batch-size", batch_size, 1)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(name, f"{value!r} is below {low}", f"use {name} {low} or more")
    kind = resolve_device(device).type
    candidates = candidate_presets(kind, native_bf16=kind == "cpu" and cpu_has_native("bfloat16"))
    unknown = [p for p in exclude if not any(p in parts_of(c) for c in candidates)]
    if unknown:
        raise ConfigError("--exclude", f"{', '.join(unknown)} is in no candidate",
                          "name parts such as tiny-vae, deepcache, tome, cfg-cutoff-50")
    candidates = [c for c in candidates if not set(exclude) & set(parts_of(c))]
    return ProfileKey(family=family, size=size, steps=steps, batch_size=batch_size, device=kind,
                      candidates=tuple(candidates), model=model)


def find_profile(key: ProfileKey, *, measure: str = "auto", folder: Path | None = None, repeats: int = 2,
                 warmup: int = 1, say=print) -> dict:
    """The stored profile if current; measured when missing or stale (`measure="auto"`), always ("always"), or
    never ("never": a ConfigError says how to measure)."""
    if measure not in ("auto", "always", "never"):
        raise ConfigError("measure", f"{measure!r} is not auto, always or never", "use auto")
    if measure != "always":
        report, why = load_profile(key, folder)
        if report is not None:
            return report
        if measure == "never":
            raise ConfigError("profile", why, f"measure it: python -m sdaccel plan --budget ... --family "
                              f"{key.family} --size {key.size} --steps {key.steps} --measure")
        say(f"[plan] measuring this machine ({why}): {len(key.candidates)} combinations, a few minutes at 512px")
    return measure_profile(key, repeats=repeats, warmup=warmup, folder=folder, say=say)


def make_plan(budget, *, family: str = "sd15", size: int = 512, steps: int = 20, batch_size: int = 1,
              device: str = "auto", lossless: bool = False, min_psnr_db: float | None = None,
              exclude: tuple = (), headroom: float = 0.05, measure: str = "auto", profile: str | None = None,
              folder: Path | None = None, repeats: int = 2, warmup: int = 1, model: str = "",
              say=print) -> tuple[Plan, dict]:
    """(the plan, the profile it was chosen from). `profile` reads a `bench --json` report instead; `model`
    measures that checkpoint rather than the family's architecture with random weights."""
    budget_mb = parse_budget(budget)
    if profile:
        report = read_report(Path(profile).expanduser())
        reason = stale_reason(report, None)
        if reason:
            say(f"[plan] note: {profile} was measured elsewhere or long ago ({reason}); its figures may not hold here")
        if exclude:
            report = {**report, "rows": [r for r in report["rows"] if not set(exclude) & set(parts_of(r["preset"]))]}
    else:
        key = profile_key(family, size, steps, batch_size=batch_size, device=device, exclude=tuple(exclude),
                          model=model)
        report = find_profile(key, measure=measure, folder=folder, repeats=repeats, warmup=warmup, say=say)
    return choose(report, budget_mb, lossless=lossless, min_psnr_db=min_psnr_db, headroom=headroom), report


def apply_plan(plan: Plan, spec, request, *, tiny_vae: str | None = None):
    """(spec, request) with the plan's combination applied. The profile decodes its Tiny VAE rows with random
    weights of the same architecture (same cost): a real model needs a real TAESD file for them."""
    from ..bench.presets import resolve_preset

    spec, request = resolve_preset(plan.preset).apply(spec, request)
    vae = spec.optimization("vae")
    if vae is not None and vae.path == "synthetic" and not spec.model.is_synthetic:
        if not tiny_vae:
            raise ConfigError("tiny_vae", f"the plan {plan.preset!r} decodes with the Tiny VAE, and no TAESD file "
                              "was given", "give the Tiny VAE file (taesd / taesdxl .safetensors), or exclude "
                              "tiny-vae from the plan")
        spec = spec.with_optimization(replace(vae, path=str(tiny_vae)))
    return spec, request


def family_of(model) -> str:
    """The family a ModelRef names or its weights show (read from the file's header: nothing is loaded)."""
    from ..models.checkpoint import open_checkpoint
    from ..models.detect import detect_folder, detect_single_file

    if model.family and model.family != "auto":
        return model.family
    if model.is_synthetic:
        return model.path.split(":", 1)[1]
    path = Path(model.path).expanduser()
    if path.is_dir():
        return detect_folder(path, "auto", model.prediction_type).family.name
    return detect_single_file(open_checkpoint(path), "auto", model.prediction_type).family.name


QUALITY = {"any": {}, "at least 30 dB": {"min_psnr_db": 30.0}, "lossless": {"lossless": True}}


def plan_for(spec, request, budget, *, quality: str = "any", tiny_vae: str = "", measure: str = "auto",
             folder: Path | None = None, say=print):
    """(spec, request, plan, profile) for a front-end's generation: the profile of the spec's family at the
    request's size, steps and batch; the Tiny VAE rows only where a TAESD file is given (or the model is random)."""
    if quality not in QUALITY:
        raise ConfigError("quality", f"{quality!r} is not one of {', '.join(QUALITY)}", "pick one of those")
    from ..models.families import FAMILIES

    exclude = () if tiny_vae or spec.model.is_synthetic else ("tiny-vae",)
    family = FAMILIES[family_of(spec.model)]
    size = max(request.width or family.size, request.height or family.size)
    size = max(64, (size + 63) // 64 * 64)  # profiles are kept per 64 px
    model = spec.model.path if spec.model.path.startswith("synthetic-tiny:") else ""
    plan, report = make_plan(budget, family=family.name, size=size, steps=request.steps or family.steps,
                             batch_size=request.batch_size or 1, device=spec.device, exclude=exclude,
                             measure=measure, folder=folder, model=model, say=say, **QUALITY[quality])
    spec, request = apply_plan(plan, spec, request, tiny_vae=tiny_vae or None)
    return spec, request, plan, report
