"""Winograd convolution for the 3x3 stride-1 convolutions of the UNet and the VAE.

The headline technique of the optimized stable-diffusion.cpp (arXiv 2412.05781), done in PyTorch:
fewer multiplications per output (F(2,3): 2.25x, F(4,3): 4x, F(6,3): 5.1x fewer) where oneDNN's
direct convolution is already at the CPU's peak. Which algorithm runs is measured per convolution
shape and memory layout on this machine once and kept on disk (see cpukernels/calibrate.py): a layer
switches to Winograd only where it is measurably faster, so no layer gets slower. The transforms run
compiled where a C++ compiler works (cpukernels/fused.py), eager otherwise. Outputs match F.conv2d to
fp32 rounding (about 1e-6 relative for F(2,3), 3e-5 for F(4,3)/F(6,3)); half precision stays on
F.conv2d, and a model compiled by the compile unit runs its own convolutions.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from ...core.registry import ApplyContext, RunContext, Unit, register
from ...run.capabilities import available_memory_bytes, total_memory_bytes
from ...spec.errors import UnavailableError
from .config import WinogradConfig

log = logging.getLogger(__name__)


class WinogradPlanner:
    """Chooses per call (memoised per layer and shape) between F.conv2d and a Winograd tile/band."""

    def __init__(self, cfg: WinogradConfig, calibration_dir: str | None = None):
        self.cfg = cfg
        self.calibration_dir = calibration_dir
        self._calibration = None
        self.memo: dict = {}
        self.run: RunContext | None = None

    @property
    def fused(self) -> bool:
        """Whether the compiled transforms run (asked for, and they build here): decided at the first call."""
        from ....cpukernels.fused import fused_transforms_work

        return self.cfg.fused_transforms and fused_transforms_work()

    @property
    def calibration(self):
        if self._calibration is None:
            from ....cpukernels.calibrate import Calibration

            self._calibration = Calibration(self.calibration_dir, fused=self.fused)
        return self._calibration

    def __call__(self, layer, x: torch.Tensor):
        from ....cpukernels.winograd import is_channels_last

        channels_last = is_channels_last(x)
        key = (id(layer), tuple(x.shape), x.dtype, x.device, channels_last)
        choice = self.memo.get(key)
        if choice is None:
            choice = self._decide(layer, x.shape, x.dtype, x.device, channels_last)
            self.memo[key] = choice
        if self.run is not None:
            self.run.count("winograd_calls" if choice[0] == "winograd" else "winograd_conv2d_calls")
        return choice

    def _decide(self, layer, shape, dtype, device, channels_last: bool):
        if dtype != torch.float32 and self.cfg.tile == "auto":
            return ("conv2d", 0, 0)  # documented: fp16/bf16 Winograd loses too many digits; use F.conv2d
        if self.cfg.tile != "auto":
            m = int(self.cfg.tile[1:])
            return ("winograd", m, 0) if layer.reserve(m) else ("conv2d", 0, 0)
        n, c, h, w = shape
        calibration, k = self.calibration, layer.out_channels
        progress = None
        if not calibration.known(n, c, k, h, w, layer.pad, dtype, device, channels_last):
            what = (f"measuring Winograd on this CPU for N{n} C{c}->K{k} {h}x{w}"
                    f"{' channels-last' if channels_last else ''} (first use of this shape; kept for next time)")
            log.info("winograd: %s", what)
            run = self.run

            def progress(done: int, total: int) -> None:
                if run is not None:
                    run.busy(what, done, total)

        before = calibration.measured_s
        timings = calibration.timings(n, c, k, h, w, layer.pad, dtype, device, channels_last, progress=progress)
        if self.run is not None and calibration.measured_s > before:
            self.run.count("winograd_calibration_s", round(calibration.measured_s - before, 3))
            self.run.count("winograd_calibrated_shapes")
        from ....cpukernels.calibrate import ranked_choices

        # fastest first; a tile whose filters find no room in the budget falls to the next candidate
        for kind, m, band in ranked_choices(timings):
            if kind == "conv2d" or layer.reserve(m):
                return (kind, m, band)
        return ("conv2d", 0, 0)


def default_filter_budget_mb() -> int:
    """The smallest of 8 GiB, 30% of physical memory and 40% of the memory still available once the model is
    loaded: SD1.5's UNet and VAE take 7.2 GiB of filters on a 24 GB machine, while next to SDXL's 10 GB UNet
    the 30% rule alone ran the same machine out of memory."""
    budget = min(8 * 2**30, total_memory_bytes() * 0.3)
    available = available_memory_bytes()
    if available is not None:
        budget = min(budget, available * 0.4)
    return int(budget // 2**20)


@register
class Winograd(Unit):
    config_cls = WinogradConfig

    def examples(self) -> list[WinogradConfig]:
        return [WinogradConfig(tile="f4"), WinogradConfig(tile="f2", vae=False, filter_cache_mb=64)]

    def check(self, cfg: WinogradConfig, ctx: ApplyContext) -> None:
        if torch.device(ctx.device).type != "cpu":
            raise UnavailableError("winograd", "GPU libraries already use Winograd (and better kernels) inside "
                                   "cuDNN/MPS; this kernel is for CPUs", "leave it off on a GPU")

    def _apply(self, pipe, cfg: WinogradConfig, ctx: ApplyContext, patch) -> None:
        from ....cpukernels.adapter import FilterCache, patch_convs

        planner = WinogradPlanner(cfg, cfg.calibration_dir or None)
        cache = FilterCache((cfg.filter_cache_mb or default_filter_budget_mb()) * 2**20)  # shared by every module
        patched = []
        for name in ("unet", "vae"):
            if getattr(cfg, name) and getattr(pipe, name, None) is not None:
                patched.append(patch_convs(getattr(pipe, name), planner, cache))
        for p in reversed(patched):
            patch.on_remove(p.restore)
        patch.info.update(planner=planner, patched=patched,
                          layers=sum(len(p.swaps) for p in patched))
        log.info("winograd: %d convolutions can switch to Winograd (tile %s)", patch.info["layers"], cfg.tile)

    def run_scope(self, cfg: WinogradConfig, handle, run: RunContext):
        planner: WinogradPlanner = handle.info["planner"]

        @contextmanager
        def scope():
            planner.run = run
            try:
                yield
            finally:
                planner.run = None
                cache = handle.info["patched"][0].cache if handle.info["patched"] else None
                if cache is not None:
                    run.counters["winograd_filter_cache_mb"] = round(cache.used / 2**20, 1)

        return scope()
