"""A planner profile: the bench report of the candidate combinations, kept per machine on disk.

It is measured once per machine, device, family, size, steps and batch (`measure_profile`, the bench runner with
its warm-up, repeats and fidelity columns) and read back by `load_profile`, which says why a stored one is stale:
another CPU, torch, thread count or device, another candidate list or measurement method, or older than
`MAX_AGE_DAYS` (a driver or library update changes the figures). A `bench --json` report of any presets can be
given as a profile too; then the planner chooses among its rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..spec.errors import ConfigError

log = logging.getLogger(__name__)

MEASUREMENT = 1  # raise when the way a profile is measured changes: stored ones are then re-measured
MAX_AGE_DAYS = 30


@dataclass(frozen=True)
class ProfileKey:
    """What a profile's figures hold for."""

    family: str = "sd15"
    size: int = 512
    steps: int = 20
    batch_size: int = 1
    device: str = "cpu"
    candidates: tuple = field(default_factory=tuple)
    model: str = ""  # a checkpoint measured instead of the family's architecture with random weights

    def file_name(self, machine: str) -> str:
        model = "-" + hashlib.sha1(str(Path(self.model).resolve()).encode()).hexdigest()[:8] if self.model else ""
        return (f"plan-{machine}-{self.device}-{self.family}{model}-{self.size}px-{self.steps}steps-"
                f"b{self.batch_size}.json")


def default_profile_dir() -> Path:
    """$SDACCEL_PLAN_DIR, else the cache folder's `plans/` (~/.cache/sdaccel/plans)."""
    from ...cpukernels.paths import default_cache_dir

    explicit = os.environ.get("SDACCEL_PLAN_DIR")
    return Path(explicit) if explicit else default_cache_dir() / "plans"


def machine_id() -> str:
    """The CPU model, torch version and thread count, hashed (the Winograd calibration's key)."""
    from ...cpukernels.calibrate import machine_key

    return machine_key()


def profile_path(key: ProfileKey, folder: Path | None = None) -> Path:
    return Path(folder or default_profile_dir()) / key.file_name(machine_id())


def stale_reason(report: dict, key: ProfileKey | None, now: float | None = None) -> str | None:
    """Why a stored profile no longer describes this machine and request (None: it still does)."""
    from ..run.capabilities import machine_summary

    plan = report.get("plan") or {}
    if key is not None:
        if plan.get("measurement") != MEASUREMENT:
            return "it was measured the old way"
        if tuple(plan.get("candidates") or ()) != tuple(key.candidates):
            return "the candidate combinations changed"
        settings = report.get("settings") or {}
        wanted = {"family": key.family, "size": key.size, "steps": key.steps, "batch_size": key.batch_size}
        for name, value in wanted.items():
            if settings.get(name) != value:
                return f"it was measured for {name} {settings.get(name)!r}, not {value!r}"
        if not str(report.get("device", "")).startswith(key.device):
            return f"it was measured on {report.get('device')!r}, not {key.device!r}"
    then, here = report.get("machine") or {}, machine_summary()
    for name in ("cpu", "torch", "torch_threads", "gpu"):
        if then.get(name) != here.get(name):
            return f"{name} was {then.get(name)!r}, now {here.get(name)!r}"
    measured = plan.get("measured_at")
    if measured is not None and ((now or time.time()) - float(measured)) > MAX_AGE_DAYS * 86400:
        return f"it is older than {MAX_AGE_DAYS} days"
    return None


def read_report(path: Path) -> dict:
    """A bench report from disk, or a ConfigError naming the file and what to do."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError("--profile", f"{path} does not exist", "give a `bench --json` report or omit --profile "
                          "to measure this machine's own") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError("--profile", f"{path} is not a readable bench report ({exc})",
                          "delete it (the planner measures a new one) or write one with `bench --json`") from exc
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
        raise ConfigError("--profile", f"{path} has no bench rows",
                          "delete it (the planner measures a new one) or write one with `bench --json`")
    return report


def load_profile(key: ProfileKey, folder: Path | None = None) -> tuple[dict | None, str]:
    """(the stored profile, "") when it is current, else (None, why it must be measured)."""
    path = profile_path(key, folder)
    if not path.is_file():
        return None, f"no profile yet at {path}"
    try:
        report = read_report(path)
    except ConfigError as exc:
        log.warning("%s", exc)
        return None, f"the stored profile {path} is unreadable"
    reason = stale_reason(report, key)
    if reason:
        return None, f"the stored profile {path} is stale: {reason}"
    return report, ""


def measure_profile(key: ProfileKey, *, repeats: int = 2, warmup: int = 1, folder: Path | None = None,
                    cache=None, say=print) -> dict:
    """Bench every candidate (one model load; each row warmed up and repeated) and store the report atomically:
    an interrupted measurement leaves the previous profile (or none), never a partial one."""
    from ..bench.runner import BenchSettings, run_bench, write_json

    settings = BenchSettings(family=key.family, size=key.size, steps=key.steps, presets=list(key.candidates),
                             repeats=repeats, warmup=warmup, device=key.device, batch_size=key.batch_size,
                             checkpoint=key.model or None)
    report = run_bench(settings, cache=cache, say=say)
    report["plan"] = {"measurement": MEASUREMENT, "candidates": list(key.candidates), "measured_at": time.time()}
    path = profile_path(key, folder)
    write_json(report, path)
    say(f"[plan] profile saved: {path}")
    return report
