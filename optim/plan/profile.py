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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..spec.errors import ConfigError

log = logging.getLogger(__name__)

MEASUREMENT = 2  # raise when the way a profile is measured changes: stored ones are then re-measured
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


def profile_path(key: ProfileKey, folder: Path | None = None) -> Path:
    """Per machine: the CPU model, torch version and thread count, hashed (the Winograd calibration's key)."""
    from ...cpukernels.calibrate import machine_key

    return Path(folder or default_profile_dir()) / key.file_name(machine_key())


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


# The pack's CLI in a child process, wherever the pack lives (installed, or a ComfyUI/A1111 extension folder of any
# name): its folder is mounted as the package `sdaccel` without running its ComfyUI entry file.
_LAUNCH = ("import importlib, sys, types; package = types.ModuleType('sdaccel'); package.__path__ = [sys.argv[1]]; "
           "sys.modules['sdaccel'] = package; "
           "sys.exit(importlib.import_module('sdaccel.optim.cli').main(sys.argv[2:]))")
PACK_ROOT = Path(__file__).resolve().parents[2]


def _bench_args(key: ProfileKey, preset: str, *, repeats: int, warmup: int, out: Path) -> list[str]:
    args = [sys.executable, "-c", _LAUNCH, str(PACK_ROOT), "bench", "--preset", preset, "--family", key.family,
            "--size", str(key.size), "--steps", str(key.steps), "--batch-size", str(key.batch_size),
            "--repeats", str(repeats), "--warmup", str(warmup), "--device", key.device, "--json", str(out)]
    return args + (["--checkpoint", key.model] if key.model else [])


def _measure_one(args: list[str], out: Path, timeout_s: float) -> tuple[dict | None, str]:
    """(the one-row report `out` holds, "") or (None, why the process failed), its own error line included."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return None, f"took over {timeout_s:.0f} s"
    if done.returncode != 0 or not out.is_file():
        lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
        return None, f"the bench process failed (exit {done.returncode}): {lines[-1] if lines else 'no message'}"
    return json.loads(out.read_text(encoding="utf-8")), ""


def measure_profile(key: ProfileKey, *, repeats: int = 2, warmup: int = 1, folder: Path | None = None,
                    say=print, timeout_s: float = 3600.0) -> dict:
    """Bench every candidate, each in a process of its own (a fresh heap: its memory peak is its own, not what
    the candidates before it left), against the baseline images the first process keeps; store the report
    atomically: an interrupted measurement leaves the previous profile (or none), never a partial one."""
    from ..bench.runner import set_speedups, write_json

    rows: list[dict] = []
    first: dict | None = None
    with tempfile.TemporaryDirectory(prefix="sdaccel-plan-") as scratch:
        reference = Path(scratch) / "baseline.safetensors"
        candidates = list(key.candidates)
        if candidates[:1] != ["baseline"]:
            raise ConfigError("candidates", "the first candidate must be baseline (the fidelity reference)")
        for i, preset in enumerate(candidates, 1):
            out = Path(scratch) / f"{i}.json"
            args = _bench_args(key, preset, repeats=repeats, warmup=warmup, out=out)
            args += ["--save-reference", str(reference)] if i == 1 else ["--reference", str(reference)]
            if i > 1 and not reference.is_file():
                rows.append({"preset": preset, "skipped": "no baseline images to compare with"})
                continue
            report, why = _measure_one(args, out, timeout_s)
            row = report["rows"][0] if report else {"preset": preset, "skipped": why}
            first = first or report
            rows.append(row)
            said = (f"{row['median_s']:.2f} s, peak {row['peak_mem_mb']:.0f} MB" if "median_s" in row
                    else f"skipped: {row['skipped']}")
            say(f"[plan] {i}/{len(candidates)} {preset}: {said}")
    if first is None:
        raise ConfigError("profile", "no candidate could be measured", "run `python -m sdaccel bench` to see why")
    set_speedups(rows)
    report = {**first, "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "plan": {"measurement": MEASUREMENT, "candidates": candidates, "measured_at": time.time(),
                       "isolation": "one process per candidate"}}
    path = profile_path(key, folder)
    write_json(report, path)
    say(f"[plan] profile saved: {path}")
    return report
