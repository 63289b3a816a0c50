"""The optimization protocol: config + `apply(pipe, cfg, ctx) -> handle`, a registry, order and conflicts.

Every optimization is a `Unit` registered here. Whatever order a user wires toggles in, they are
applied in the canonical order below; conflicting pairs are rejected before anything changes, with
a message that says how to fix the combination.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

from .errors import ConflictError, UnavailableError
from .fields import Config
from .patching import PatchSet, new_patchset

log = logging.getLogger(__name__)


class Stage(IntEnum):
    """Canonical application order (DESIGN.md)."""

    PRECISION = 0
    ATTENTION = 1
    MEMORY_FORMAT = 2
    CONV_KERNEL = 3
    UNET_CACHE = 4
    VAE = 5
    OFFLOAD = 6
    COMPILE = 7


@dataclass(frozen=True)
class OptimizationConfig(Config):
    """Settings of one optimization unit; subclasses set `kind` and declare fields with `option`."""

    kind: ClassVar[str] = ""


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
    register `stage_listeners(event, stage)` called with ("start" | "end", "text_encode" | ...).
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
    """One optimization. Subclasses set the class attributes and implement `_apply`."""

    kind: ClassVar[str] = ""
    title: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.PRECISION
    config_cls: ClassVar[type[OptimizationConfig]] = OptimizationConfig
    lossless: ClassVar[bool] = True
    # other kind -> why they cannot combine and what to do instead
    conflicts: ClassVar[dict[str, str]] = {}

    def examples(self) -> list[OptimizationConfig]:
        """Representative configs that change the pipeline on a CPU; the contract suite runs each one."""
        return [self.config_cls()]

    def check(self, cfg: OptimizationConfig, ctx: ApplyContext) -> None:
        """Raise UnavailableError/ConfigError if `cfg` cannot run here; called before anything changes."""

    def fallback(self, cfg: OptimizationConfig, ctx: ApplyContext) -> OptimizationConfig | None:
        """What to run instead when `cfg` is unavailable here (None: leave this optimization out)."""
        return None

    def conflict_with(self, cfg: OptimizationConfig, other: OptimizationConfig) -> str | None:
        """Why `cfg` cannot combine with `other`, or None. Defaults to the static `conflicts` table."""
        return self.conflicts.get(other.kind)

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
        return patch

    def _apply(self, pipe, cfg, ctx: ApplyContext, patch: PatchSet) -> None:
        raise NotImplementedError


UNITS: dict[str, Unit] = {}


def register(unit_cls: type[Unit]) -> type[Unit]:
    """Class decorator adding a unit to the registry under its `kind`."""
    if unit_cls.kind in UNITS:
        raise ValueError(f"optimization {unit_cls.kind!r} is registered twice")
    UNITS[unit_cls.kind] = unit_cls()
    return unit_cls


def all_units() -> dict[str, Unit]:
    """Every registered unit, in canonical order (importing the unit modules on first use)."""
    from . import units  # noqa: F401  (registers the built-in units)

    return dict(sorted(UNITS.items(), key=lambda kv: (kv[1].stage, list(UNITS).index(kv[0]))))


def get_unit(kind: str) -> Unit:
    units = all_units()
    try:
        return units[kind]
    except KeyError:
        raise ConflictError("optimization", f"unknown optimization {kind!r}",
                            f"known: {', '.join(units)}") from None


def config_class(kind: str) -> type[OptimizationConfig]:
    return get_unit(kind).config_cls


def canonical_order(configs) -> tuple[OptimizationConfig, ...]:
    """Sort configs by the canonical stage order; two configs of one kind are an error."""
    units = all_units()
    order = list(units)
    seen: dict[str, OptimizationConfig] = {}
    for cfg in configs:
        if cfg.kind not in units:
            raise ConflictError("optimization", f"unknown optimization {cfg.kind!r}", f"known: {', '.join(units)}")
        if cfg.kind in seen:
            raise ConflictError(f"optimizations.{cfg.kind}", "set twice",
                                "keep one toggle of each kind (the later node replaces the earlier)")
        seen[cfg.kind] = cfg
    return tuple(sorted(seen.values(), key=lambda c: order.index(c.kind)))


def check_conflicts(configs) -> None:
    """Raise ConflictError for the first pair that cannot combine, naming both and the fix."""
    configs = list(configs)
    units = all_units()
    for i, a in enumerate(configs):
        for b in configs[i + 1:]:
            reason = units[a.kind].conflict_with(a, b) or units[b.kind].conflict_with(b, a)
            if reason:
                raise ConflictError(f"optimizations {a.kind} + {b.kind}", "cannot be combined: " + reason)


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
            notes.append(f"{option} unavailable ({reason}); using {unit.kind} "
                         f"{_changed_fields(replacement) or 'defaults'} instead")
        else:
            notes.append(f"{option} unavailable ({reason}); running without {unit.kind}")
    for note in notes:
        log.warning(note)
    return kept, notes


def _changed_fields(cfg) -> str:
    default = type(cfg)().to_dict()
    return ",".join(f"{k}={v}" for k, v in cfg.to_dict().items() if v != default[k])


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
           "canonical_order", "check_conflicts", "apply_all", "remove_all", "UnavailableError"]
