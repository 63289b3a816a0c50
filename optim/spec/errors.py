"""Errors SDAccel raises on purpose: each names the file or field at fault and says what to do."""

from __future__ import annotations


class SDAccelError(Exception):
    """Base class: a problem the user can fix, described in words they can act on."""


class CheckpointError(SDAccelError):
    """A checkpoint file or folder that cannot be used as given."""

    def __init__(self, path, problem: str, fix: str):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}. {fix}")


class ConfigError(SDAccelError, ValueError):
    """A spec, request or optimization field holding a value it cannot hold."""

    def __init__(self, field: str, problem: str, fix: str = ""):
        self.field = field
        super().__init__(f"{field}: {problem}" + (f". {fix}" if fix else ""))


class ConflictError(ConfigError):
    """Two optimizations that cannot be combined; raised before anything is applied."""


class UnavailableError(SDAccelError):
    """An option this machine cannot provide (no CUDA, package missing, no native bf16, ...)."""

    def __init__(self, option: str, reason: str, fix: str = ""):
        self.option = option
        self.reason = reason
        super().__init__(f"{option} is unavailable here: {reason}" + (f". {fix}" if fix else ""))


class AlreadyAppliedError(SDAccelError):
    """The same optimization applied twice to one pipeline."""


class GenerationInterrupted(SDAccelError):
    """A run stopped at a step boundary because the caller asked it to; the pipeline stays usable."""

    def __init__(self, step: int, total: int):
        self.step = step
        self.total = total
        super().__init__(f"generation interrupted before step {step + 1} of {total}")
