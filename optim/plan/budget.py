"""A memory budget as users type it ("6GB", "6 GiB", "5500MB", "6"), in MiB."""

from __future__ import annotations

import re

from ..spec.errors import ConfigError

_UNITS = {"": 1024.0, "g": 1024.0, "gb": 1024.0, "gib": 1024.0, "m": 1.0, "mb": 1.0, "mib": 1.0}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_budget(text, field: str = "--budget") -> float:
    """MiB from "6GB"/"6 GiB"/"5500MB"/"6" (a bare number is GB); GB and GiB both mean 1024 MiB, as the
    memory figures users read (task managers, nvidia-smi) do."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = f"{text}GB"
    match = _PATTERN.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(field, f"{text!r} is not a memory size", "write it like 6GB, 5.5GB or 5500MB")
    mib = float(match.group(1)) * _UNITS[unit]
    if mib <= 0:
        raise ConfigError(field, f"{text!r} is no memory at all", "give a budget above 0, e.g. 6GB")
    return mib
