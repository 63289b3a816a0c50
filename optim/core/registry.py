"""The optimization protocol: `Unit.apply(pipe, cfg, ctx) -> handle`, the unit registry, apply and remove all.

Every optimization's behaviour is a `Unit` registered here against its config class (which lives in
`spec/` and carries the stage, title and conflicts). Whatever order a user wires toggles in, they are
applied in the canonical order; conflicting pairs are rejected before anything changes, with a
message that says how to fix the combination.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

from ..spec.errors import ConflictError, UnavailableError
from ..spec.optimization import OptimizationConfig, Stage, canonical_order, check_conflicts, config_class
from .patching import PatchSet, new_patchset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyContext:
    """What a unit needs to know about where the pipeline will run."""

    device: object  # torch.device
    family: object  # families.Family
    offloaded: bool = False  # an offload unit manages placement; weights stay on the CPU


@dataclass
class RunContext:
    """What run-scoped effects see during one run; the sampler updates `step` and announces stages.

    Units add to `notes` (shown in RunStats) and `counters` (e.g. skipped block calls), and may
    register `stage_listeners(event, stage)` called with ("start" | "end", "text_encode" | ...). The caller
    registers `busy_listeners(what, done, total)` to show, and interrupt, long work a unit does inside a step.
    """

    pipe: object
    family: object
    device: object
    steps: int
    batch: int
    cfg_steps: int  # steps run with classifier-free guidance (the rest run the conditional pass only)
    step: int = 0
    notes: list = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    stage_listeners: list = field(default_factory=list)
    busy_listeners: list = field(default_factory=list)

    def busy(self, what: str, done: int, total: int) -> None:
        """Long one-time work inside a step (a first-use calibration): every listener hears how far it is, and
        may raise (an interrupt) to stop it there."""
        for listener in self.busy_listeners:
            listener(what, done, total)

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    @contextmanager
    def stage(self, name: str):
        for listener in self.stage_listeners:
            listener("start", name)
        try:
            yield
        finally:
            for listener in reversed(self.stage_listeners):
                listener("end", name)


class Unit:
    """One optimization's behaviour. Subclasses set `config_cls` and implement `_apply`.

    `kind`, `title`, `stage` and `lossless` are read from the config class, which is the one place
    they are written.
    """

    config_cls: ClassVar[type[OptimizationConfig]] = OptimizationConfig
    kind: ClassVar[str] = ""
    title: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.PRECISION
    lossless: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cfg = cls.config_cls
        cls.kind, cls.title, cls.stage, cls.lossless = cfg.kind, cfg.title, cfg.stage, cfg.lossless

    def examples(self) -> list[OptimizationConfig]:
        """Representative configs that change the pipeline on a CPU; the contract suite runs each one."""
        return [self.config_cls()]

    def check(self, cfg: OptimizationConfig, ctx: ApplyContext) -> None:
        """Raise UnavailableError/ConfigError if `cfg` cannot run here; called before anything changes."""

    def fallback(self, cfg: OptimizationConfig, ctx: ApplyContext) -> OptimizationConfig | None:
        """What to run instead when `cfg` is unavailable here (None: leave this optimization out)."""
        return None

    def run_scope(self, cfg: OptimizationConfig, handle: PatchSet, run: RunContext):
        """A context manager wrapping each run (torch flags, per-run caches), or None.

        Effects installed here are removed when the run ends, even if it fails or is interrupted.
        """
        return None

    def apply(self, pipe, cfg: OptimizationConfig, ctx: ApplyContext) -> PatchSet:
        """Apply to `pipe`; the returned handle's `remove()` restores the exact prior state."""
        if not isinstance(cfg, self.config_cls):
            raise TypeError(f"{self.kind} expects {self.config_cls.__name__}, got {type(cfg).__name__}")
        self.check(cfg, ctx)
        patch = new_patchset(pipe, self.kind)
        try:
            self._apply(pipe, cfg, ctx, patch)
        except BaseException:
            patch.remove()
            raise
        patch.info.setdefault("config", cfg)

        def reapply() -> None:  # after an earlier-applied set was removed underneath this one
            kept = {k: patch.info[k] for k in ("config", "notes") if k in patch.info}
            patch.info.clear()
            patch.info.update(kept)
            self._apply(pipe, cfg, ctx, patch)

        patch.reapply = reapply
        return patch

    def _apply(self, pipe, cfg, ctx: ApplyContext, patch: PatchSet) -> None:
        raise NotImplementedError


UNITS: dict[str, Unit] = {}


def register(unit_cls: type[Unit]) -> type[Unit]:
    """Class decorator adding a unit to the registry under its config's `kind`."""
    if unit_cls.kind in UNITS:
        raise ValueError(f"optimization {unit_cls.kind!r} is registered twice")
    if not unit_cls.kind:
        raise ValueError(f"{unit_cls.__name__} has no config_cls with a kind")
    UNITS[unit_cls.kind] = unit_cls()
    return unit_cls


def all_units() -> dict[str, Unit]:
    """Every registered unit, in canonical order (importing the unit modules on first use)."""
    from ..units import load_units

    load_units()
    order = list(UNITS)
    return dict(sorted(UNITS.items(), key=lambda kv: (kv[1].stage, order.index(kv[0]))))


def get_unit(kind: str) -> Unit:
    units = all_units()
    try:
        return units[kind]
    except KeyError:
        raise ConflictError("optimization", f"unknown optimization {kind!r}",
                            f"known: {', '.join(units)}") from None


def check_available(configs, ctx: ApplyContext) -> None:
    """Run every unit's capability check before any of them changes the pipeline."""
    units = all_units()
    for cfg in configs:
        units[cfg.kind].check(cfg, ctx)


def resolve_available(configs, ctx: ApplyContext) -> tuple[list, list[str]]:
    """Replace each unavailable config by its unit's fallback (or drop it); return (configs, one-line notes)."""
    units = all_units()
    kept, notes = [], []
    for cfg in configs:
        unit = units[cfg.kind]
        try:
            unit.check(cfg, ctx)
            kept.append(cfg)
            continue
        except UnavailableError as exc:
            reason = exc.reason
            option = exc.option
        replacement = unit.fallback(cfg, ctx)
        if replacement is not None:
            unit.check(replacement, ctx)
            kept.append(replacement)
            notes.append(f"{option} unavailable ({reason}); using {replacement.label()} instead")
        else:
            notes.append(f"{option} unavailable ({reason}); running without {unit.kind}")
    for note in notes:
        log.warning(note)
    return kept, notes


def apply_all(pipe, configs, ctx: ApplyContext, *, strict: bool = True) -> list[PatchSet]:
    """Check, then apply `configs` in canonical order; on failure, undo what was applied and re-raise.

    strict=False replaces unavailable options by their fallbacks instead of raising (the UI path);
    the notes saying so are left on the first handle's `info["notes"]`.
    """
    configs = canonical_order(configs)
    check_conflicts(configs)
    notes: list[str] = []
    if strict:
        check_available(configs, ctx)
    else:
        configs, notes = resolve_available(configs, ctx)
        configs = canonical_order(configs)
        check_conflicts(configs)
    handles: list[PatchSet] = []
    try:
        for cfg in configs:
            handles.append(get_unit(cfg.kind).apply(pipe, cfg, ctx))
    except BaseException:
        remove_all(handles)
        raise
    if handles and notes:
        handles[0].info["notes"] = notes
    return handles


def remove_all(handles) -> None:
    """Remove handles in reverse application order."""
    for handle in reversed(list(handles)):
        handle.remove()


__all__ = ["Stage", "OptimizationConfig", "ApplyContext", "RunContext", "Unit", "register", "all_units", "get_unit",
           "config_class", "canonical_order", "check_conflicts", "check_available", "resolve_available", "apply_all",
           "remove_all", "UnavailableError"]
