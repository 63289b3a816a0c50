"""Choosing from a profile: the fastest measured combination whose peak fits the budget, with what it costs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..spec.errors import ConfigError
from .candidates import LOSSLESS_PSNR_DB, declared_lossy, parts_of


@dataclass(frozen=True)
class PartCost:
    """The fidelity a lossy part costs by itself, from the profile row with the fewest other parts."""

    part: str
    measured_in: str
    psnr_db: float | None
    ssim: float | None
    random_vae: bool = False  # measured with a random-weight replacement VAE: no trained decoder's fidelity


@dataclass(frozen=True)
class Plan:
    preset: str
    budget_mb: float
    limit_mb: float  # the budget less the headroom: what the pick's measured peak stays under
    row: dict
    lossy_parts: tuple = ()
    fits: tuple = ()  # every row that fits (fastest first)
    excluded: tuple = ()  # rows that fit but fall below the quality floor

    @property
    def expected_s(self) -> float:
        return self.row["median_s"]

    @property
    def peak_mb(self) -> float:
        return self.row["peak_mem_mb"]


def is_lossless(row: dict) -> bool:
    """Measured as the baseline's image up to float rounding, and no part lossy by design."""
    measured = row.get("psnr_db") is None or row["psnr_db"] >= LOSSLESS_PSNR_DB
    return measured and not any(declared_lossy(part) for part in parts_of(row.get("preset", "")))


def part_cost(rows: list[dict], part: str) -> PartCost | None:
    """`part`'s own fidelity: the row holding it with the fewest parts (ties: the most faithful)."""
    holding = [r for r in rows if part in parts_of(r["preset"])]
    if not holding:
        return None
    best = min(holding, key=lambda r: (len(parts_of(r["preset"])), -(r.get("psnr_db") or float("inf"))))
    random_vae = any("random-weight" in str(note) and "VAE" in str(note) for note in best.get("notes") or ())
    return PartCost(part, best["preset"], best.get("psnr_db"), best.get("ssim"), random_vae)


def choose(report: dict, budget_mb: float, *, lossless: bool = False, min_psnr_db: float | None = None,
           headroom: float = 0.05) -> Plan:
    """The fastest row of `report` whose measured peak is within `budget_mb` less `headroom` (run-to-run spread
    of the peak), optionally only lossless rows or rows at `min_psnr_db` or better."""
    if not 0 <= headroom < 0.5:
        raise ConfigError("--headroom", f"{headroom!r} is outside 0-0.5", "use e.g. 0.05 (5% of the budget)")
    rows = [r for r in report.get("rows", []) if "median_s" in r]
    if not rows:
        raise ConfigError("profile", "no measured row", "measure again: every candidate was skipped")
    limit = budget_mb * (1.0 - headroom)
    fits = sorted((r for r in rows if r["peak_mem_mb"] <= limit), key=lambda r: r["median_s"])

    def good_enough(row: dict) -> bool:
        if lossless and not is_lossless(row):
            return False
        return min_psnr_db is None or row.get("psnr_db") is None or row["psnr_db"] >= min_psnr_db

    allowed = [r for r in fits if good_enough(r)]
    excluded = tuple(r for r in fits if not good_enough(r))
    if not allowed:
        smallest = min((r for r in rows if good_enough(r)), key=lambda r: r["peak_mem_mb"], default=None)
        kind = rows[0].get("mem_kind") or "memory"
        if smallest is None:
            raise ConfigError("--min-psnr" if min_psnr_db is not None else "--lossless",
                              "no measured combination is that faithful", "lower --min-psnr or allow lossy parts")
        need_gb = math.ceil(smallest["peak_mem_mb"] / (1.0 - headroom) / 1024 * 10) / 10
        hint = ", or allow lossy parts" if lossless or min_psnr_db is not None else ""
        raise ConfigError("--budget", f"{budget_mb:.0f} MB is below every measured combination's peak ({kind}; the "
                          f"smallest, {smallest['preset']}, peaked at {smallest['peak_mem_mb']:.0f} MB)",
                          f"give at least {need_gb:.1f}GB, or a smaller --size or batch{hint}")
    pick = allowed[0]
    lossy = tuple(cost for part in parts_of(pick["preset"]) if (cost := part_cost(rows, part)) is not None
                  and not is_lossless({"preset": part, "psnr_db": cost.psnr_db}))
    return Plan(pick["preset"], budget_mb, limit, pick, lossy, tuple(fits), excluded)


def format_plan(plan: Plan, report: dict) -> str:
    """The choice, its expected time and memory, the fidelity cost of each lossy part, and every candidate."""
    row, settings, machine = plan.row, report.get("settings", {}), report.get("machine", {})
    kind = row.get("mem_kind") or "peak"
    stage_peaks = ", ".join(f"{k} {v:.0f}" for k, v in (row.get("stage_peak_mem_mb") or {}).items())
    lines = [f"choice: {plan.preset}",
             f"  expected time {row['median_s']:.2f} s per image (measured {row['min_s']:.2f}-{row['max_s']:.2f} s, "
             f"{row.get('speedup') or 0:.2f}x the first row); peak {row['peak_mem_mb']:.0f} MB ({kind}) of the "
             f"{plan.budget_mb:.0f} MB budget ({plan.limit_mb:.0f} MB after headroom)",
             f"  stage peaks MB: {stage_peaks or '-'}",
             f"  use it: --preset {plan.preset}"]
    if plan.lossy_parts:
        lines.append("  lossy parts (PSNR/SSIM of the part alone against the baseline image):")
        for cost in plan.lossy_parts:
            ssim_text = "-" if cost.ssim is None else f"{cost.ssim:.3f}"
            psnr = "same image" if cost.psnr_db is None else f"{cost.psnr_db:.1f} dB"
            lines.append(f"    {cost.part}: {psnr}, SSIM {ssim_text} (row {cost.measured_in})" + (
                "; a random-weight stand-in for the VAE file was measured, so this says nothing of the trained "
                "decoder's fidelity (TAESD's authors report it close to the full VAE)" if cost.random_vae else ""))
        if row.get("psnr_db") is not None:
            lines.append(f"    together: {row['psnr_db']:.1f} dB, SSIM {row.get('ssim') or 0:.3f}")
    else:
        lines.append("  lossless: the baseline's image up to float rounding")
    lines.append("")
    lines.append(f"{'candidate':<58} {'median s':>9} {'peak MB':>8} {'PSNR dB':>8}  verdict")
    chosen = {id(plan.row)}
    excluded = {id(r) for r in plan.excluded}
    for r in report.get("rows", []):
        if "median_s" not in r:
            lines.append(f"{r['preset']:<58} skipped: {str(r.get('skipped'))[:80]}")
            continue
        verdict = ("CHOSEN" if id(r) in chosen else "over budget" if r["peak_mem_mb"] > plan.limit_mb
                   else "below the quality floor" if id(r) in excluded else "fits, slower")
        psnr = "-" if r.get("psnr_db") is None else f"{r['psnr_db']:.1f}"
        lines.append(f"{r['preset']:<58} {r['median_s']:>9.2f} {r['peak_mem_mb']:>8.0f} {psnr:>8}  {verdict}")
    lines.append(f"{settings.get('family')} {settings.get('size')}x{settings.get('size')}, {settings.get('steps')} "
                 f"steps, batch {settings.get('batch_size')}; {report.get('device')}: {machine.get('cpu')} "
                 f"({machine.get('torch_threads')} threads), torch {machine.get('torch')}; measured "
                 f"{report.get('date', '?')}")
    return "\n".join(lines)
