"""What of SDAccel a host's Python can run, told in one line at start-up instead of an import error later.

The accordion's units need torch only. The tab runs the engine's own pipeline, which needs diffusers and a
transformers new enough for it: the floors are the oldest a real host runs it with (A1111 1.10's transformers
4.30.2 beside the diffusers 0.31 that install.py adds; Forge's diffusers 0.31.0). A host with older ones keeps
its pins, and only the tab is disabled, saying why and how to enable it.
"""

from __future__ import annotations

from importlib import metadata

MIN_DIFFUSERS = (0, 31)
MIN_TRANSFORMERS = (4, 30)


def _version(name: str) -> tuple | None:
    try:
        text = metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def engine_problem() -> str | None:
    """Why the engine's pipeline (the tab) cannot run in this Python, or None when it can."""
    missing = []
    for name, minimum in (("diffusers", MIN_DIFFUSERS), ("transformers", MIN_TRANSFORMERS)):
        found = _version(name)
        if found is None or found < minimum:
            have = "not installed" if found is None else "version " + ".".join(map(str, found))
            missing.append(f"{name} >= {'.'.join(map(str, minimum))} ({have})")
    if not missing:
        return None
    return ("the SDAccel tab needs " + " and ".join(missing) + "; this host's pins are kept, so the tab is off "
            "(the txt2img/img2img accordion works). Run the tab's engine with `python -m sdaccel webui` from a "
            "venv of its own")
