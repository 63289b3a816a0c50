"""A1111/Forge run this when the extension is installed or updated: install what SDAccel needs, keeping the
host's pins.

A requirement that is missing is installed, in its floor's release series (`diffusers>=0.31` as
`diffusers~=0.31.0`: the version the real-host lanes run beside the hosts' pinned libraries; a newer one may
want newer libraries than the host pins) and with everything the host already has pinned as it is. One the
host already has in an older version is never upgraded: SDAccel says so in one line and, at start-up,
disables only what needs the newer version (extension/requirements.py). A1111 1.10 has no diffusers and pins
transformers 4.30.2: it gets diffusers 0.31.x, and the tab runs.
"""

from importlib import metadata
from pathlib import Path

import launch  # provided by the A1111/Forge launcher

_REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"


def _parse(line: str):
    requirement = line.split("#", 1)[0].strip()
    if not requirement:
        return None
    name, _, minimum = requirement.partition(">=")
    return requirement, name.strip(), minimum.strip()


def _floor_series(name: str, minimum: str) -> str:
    major_minor = ".".join((minimum.split(".") + ["0"])[:2])
    return f"{name}~={major_minor}.0"


def _older(found: str, minimum: str) -> bool:
    def key(text):
        return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in text.split(".")[:3])

    return bool(minimum) and key(found) < key(minimum)


kept, missing, pins = [], [], []
for line in _REQUIREMENTS.read_text(encoding="utf-8").splitlines():
    parsed = _parse(line)
    if parsed is None:
        continue
    requirement, name, minimum = parsed
    try:
        found = metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(_floor_series(name, minimum) if minimum else requirement)
        continue
    pins.append(f"{name}=={found}")  # what the host has stays as it is, also for what gets installed
    if _older(found, minimum):
        kept.append(f"{name} {found} (SDAccel wants >= {minimum})")
if missing:
    try:
        pins.append(f"torch=={metadata.version('torch')}")
    except metadata.PackageNotFoundError:
        pass
    quoted = " ".join(f'"{r}"' for r in missing + pins)
    launch.run_pip(f"install {quoted}", f"SDAccel requirements: {', '.join(missing)}")
if kept:
    print("SDAccel: keeping this host's " + ", ".join(kept) + "; what needs the newer version is disabled")
