"""`LoraRef`: a LoRA file and its strength, part of a PipelineSpec (merged into the weights when prepared)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .fields import Config, option


@dataclass(frozen=True)
class LoraRef(Config):
    path: str = option("", "LoRA file (.safetensors; kohya/A1111 or diffusers/PEFT format)")
    strength: float = option(1.0, "How much of the LoRA to add to the weights (1 = as trained; negative removes "
                             "its effect)", min=-10.0, max=10.0, step=0.05)

    def __post_init__(self):
        super().__post_init__()
        if not self.path:
            raise ConfigError("LoraRef.path", "is empty", "give the path of a LoRA file")

    @classmethod
    def parse(cls, text: str) -> "LoraRef":
        """`FILE[:STRENGTH]`, as the CLI's --lora takes it (a drive letter's colon is part of the file)."""
        head, sep, tail = str(text).rpartition(":")
        if sep and head and not (len(head) == 1 and head.isalpha()):
            try:
                strength = float(tail)
            except ValueError:
                raise ConfigError("--lora", f"{tail!r} after the file's ':' is not a strength",
                                  "write FILE or FILE:STRENGTH, e.g. style.safetensors:0.8") from None
            return cls(path=head, strength=strength)
        return cls(path=str(text))

    def identity(self) -> tuple:
        """Changes when the file on disk changes (a retrained LoRA saved over the old one is merged again)."""
        path = Path(self.path).expanduser()
        try:
            stamp = (path.stat().st_size, path.stat().st_mtime_ns)
        except OSError:
            stamp = None
        return (os.path.realpath(path), stamp, self.strength)
