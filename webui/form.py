"""The web UI's form values -> the engine's spec and requests; run results -> the text the UI shows.

Kept apart from the gradio layout (blocks.py) so it is plain Python a test can drive without a browser, and
the same rules hold for the standalone UI and the A1111 tab.
"""

from __future__ import annotations

from dataclasses import replace

from ..optim.spec.errors import ConfigError
from .controls import ui_fields, value_of

NO_REFINER = "None"
REQUEST_SKIP = ("cfg_cutoff_step",)  # an index that overrides cfg_cutoff: the fraction is enough in a form


def request_fields():
    from ..optim.spec.pipeline import GenerationRequest

    return ui_fields(GenerationRequest, skip=REQUEST_SKIP)


def optimization_classes() -> dict:
    from ..optim.spec.optimization import config_classes

    return config_classes()


def build_job(session, form: dict):
    """(spec, requests, checkpoint title) from a form {key tuple: value}; raises ConfigError naming the field."""
    from ..optim.spec.ensemble import EnsembleSpec
    from ..optim.spec.model_ref import ModelRef
    from ..optim.spec.optimization import check_conflicts
    from ..optim.spec.pipeline import GenerationRequest

    checkpoint = form.get(("model", "checkpoint"))
    if not checkpoint:
        raise ConfigError("Checkpoint", "none selected", "pick a checkpoint (or put one into the models folder)")
    configs = []
    for kind, cls in optimization_classes().items():
        if not form.get(("opt", kind, "enabled")):
            continue
        values = {info.name: value_of(info, form.get(("opt", kind, info.name))) for info in ui_fields(cls)
                  if ("opt", kind, info.name) in form}
        configs.append(cls(**values))
    check_conflicts(configs)
    spec, entry = session.spec(configs, checkpoint=checkpoint, family=form.get(("model", "family")) or None,
                               field="Checkpoint")
    refiner = form.get(("refiner", "checkpoint"))
    if refiner and refiner != NO_REFINER:
        refiner_entry = session.catalog.find(refiner, field="Refiner")
        switch = {info.name: value_of(info, form.get(("ensemble", info.name)))
                  for info in ui_fields(EnsembleSpec, skip=("base", "refiner")) if ("ensemble", info.name) in form}
        spec = EnsembleSpec(base=spec, refiner=replace(spec, model=ModelRef(path=refiner_entry.path)), **switch)
    values = {info.name: value_of(info, form.get(("request", info.name))) for info in request_fields()
              if ("request", info.name) in form}
    image = form.get(("init", "image"))
    if image is not None:
        values["init_image"] = image
    request = GenerationRequest(**values)
    if isinstance(spec, EnsembleSpec):
        base, request = session.prompt_loras(spec.base, request)
        spec = replace(spec, base=base)
    else:
        spec, request = session.prompt_loras(spec, request)
    return spec, [request], entry.title


def fit_settings(form: dict) -> dict | None:
    """The "Fit to memory" choices ({"budget", "quality", "tiny_vae"}), or None when it is off; checked here so a
    bad budget is refused before anything is queued."""
    from ..optim.plan.budget import parse_budget
    from ..optim.plan.planner import QUALITY

    if not form.get(("plan", "enabled")):
        return None
    refiner = form.get(("refiner", "checkpoint"))
    if refiner and refiner != NO_REFINER:
        raise ConfigError("Fit to memory", "plans one model, not the refiner ensemble",
                          "set Refiner to None, or turn Fit to memory off")
    budget = form.get(("plan", "budget_gb"))
    parse_budget(budget, field="Fit to memory: budget (GB)")
    quality = form.get(("plan", "quality")) or "any"
    if quality not in QUALITY:
        raise ConfigError("Fit to memory: quality", f"{quality!r} is not one of {', '.join(QUALITY)}")
    tiny_vae = (form.get(("plan", "tiny_vae")) or "").strip()
    return {"budget": f"{float(budget)}GB", "quality": quality, "tiny_vae": tiny_vae}


def stats_text(results) -> str:
    """What the UI shows under the images: the engine's summary line, the toggles applied and its notes."""
    lines = []
    for result in results:
        stats = result.stats
        lines.append(stats.summary_line())
        lines.append(f"{stats.it_per_s:.2f} it/s, {stats.total_s:.2f} s, peak {stats.peak_mem_mb:.0f} MB")
        lines.append("toggles: " + (", ".join(stats.optimizations) or "none"))
        lines.extend(f"note: {note}" for note in stats.notes)
    return "\n".join(lines)
