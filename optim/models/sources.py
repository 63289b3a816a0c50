"""Weights that come from somewhere other than a file: named sources that their provider registers.

`synthetic:<family>` models and the `synthetic` VAE (real architectures, random weights) serve
benchmarks and tests. They live in `optim/testing`, which the engine never imports: the bench, the
CLI and the test suite call `sdaccel.optim.testing.enable_synthetic()`, which registers them here.
"""

from __future__ import annotations

from typing import Callable

from ..spec.errors import ConfigError

KINDS = ("model", "vae-full", "vae-tiny")
_SOURCES: dict[tuple[str, str], Callable] = {}


def register_source(kind: str, name: str, build: Callable) -> None:
    """Make `name` loadable as a `kind` source: a model scheme (`name:<family>`) or a VAE path."""
    if kind not in KINDS:
        raise ValueError(f"unknown source kind {kind!r}; one of {KINDS}")
    _SOURCES[(kind, name)] = build


def source(kind: str, name: str, field: str) -> Callable:
    """The builder registered for `name`, or a ConfigError naming `field` and how to enable it."""
    try:
        return _SOURCES[(kind, name)]
    except KeyError:
        raise ConfigError(field, f"{name!r} (random weights) is not enabled in this process",
                          "random weights are for benchmarks and tests: call "
                          "sdaccel.optim.testing.enable_synthetic() first (python -m sdaccel does), or give "
                          "a real file") from None
