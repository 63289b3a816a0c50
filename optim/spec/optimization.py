"""Optimization configs as plain data: their stage, conflicts, registry and canonical order.

A config class carries everything a spec needs to know about its optimization (kind, stage, title,
whether it is lossless, what it cannot combine with), so building and checking specs never imports
torch or the units' behaviour. Units (`core/registry.py`) register the behaviour separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from .errors import ConflictError
from .fields import Config


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
    """Settings of one optimization; subclasses set the class attributes and declare fields with `option`."""

    kind: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.PRECISION
    title: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    # other kind -> why they cannot combine and what to do instead
    conflicts: ClassVar[dict[str, str]] = {}

    def conflict_with(self, other: "OptimizationConfig") -> str | None:
        """Why this config cannot combine with `other`, or None. Defaults to the static `conflicts` table."""
        return self.conflicts.get(other.kind)

    def label(self) -> str:
        """`kind` or `kind(field=value,...)` with the fields changed from their defaults."""
        changed = self.changed()
        return self.kind + (f"({','.join(f'{k}={v}' for k, v in changed.items())})" if changed else "")


_CONFIGS: dict[str, type[OptimizationConfig]] = {}


def register_config(cls: type[OptimizationConfig]) -> type[OptimizationConfig]:
    """Class decorator adding a config class to the registry under its `kind`."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    if _CONFIGS.get(cls.kind, cls) is not cls:
        raise ValueError(f"optimization config {cls.kind!r} is registered twice")
    _CONFIGS[cls.kind] = cls
    return cls


def config_classes() -> dict[str, type[OptimizationConfig]]:
    """Every registered config class by kind, in canonical order (loading the built-in ones on first use)."""
    from ..units import load_configs

    load_configs()
    order = list(_CONFIGS)
    return dict(sorted(_CONFIGS.items(), key=lambda kv: (kv[1].stage, order.index(kv[0]))))


def _unknown(kind: str, known) -> ConflictError:
    return ConflictError("optimization", f"unknown optimization {kind!r}", f"known: {', '.join(known)}")


def config_class(kind: str) -> type[OptimizationConfig]:
    classes = config_classes()
    try:
        return classes[kind]
    except KeyError:
        raise _unknown(kind, classes) from None


def canonical_order(configs) -> tuple[OptimizationConfig, ...]:
    """Sort configs by the canonical stage order; two configs of one kind are an error."""
    order = list(config_classes())
    seen: dict[str, OptimizationConfig] = {}
    for cfg in configs:
        if cfg.kind not in order:
            raise _unknown(cfg.kind, order)
        if cfg.kind in seen:
            raise ConflictError(f"optimizations.{cfg.kind}", "set twice",
                                "keep one toggle of each kind (the later node replaces the earlier)")
        seen[cfg.kind] = cfg
    return tuple(sorted(seen.values(), key=lambda c: order.index(c.kind)))


def check_conflicts(configs) -> None:
    """Raise ConflictError for the first pair that cannot combine, naming both and the fix."""
    configs = list(configs)
    for i, a in enumerate(configs):
        for b in configs[i + 1:]:
            reason = a.conflict_with(b) or b.conflict_with(a)
            if reason:
                raise ConflictError(f"optimizations {a.kind} + {b.kind}", "cannot be combined: " + reason)
