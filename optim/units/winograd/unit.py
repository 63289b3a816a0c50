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

BUILDING_NOTE = ("winograd: native kernel building in the background (once per machine, about 2-3 minutes); "
                 "this run used F.conv2d, the next one after the build picks the kernel up")


class WinogradPlanner:
    """Chooses per call (memoised per layer and shape) between F.conv2d and a Winograd kernel, and gives the
    filter budget to the native layers where keeping their transformed filters saves the most time per MB."""

    def __init__(self, cfg: WinogradConfig, calibration_dir: str | None = None):
        self.cfg = cfg
        self.calibration_dir = calibration_dir
        self._calibration = None
        self.memo: dict = {}
        self.run: RunContext | None = None
        self.storage: list = []  # (saving s per call, bytes, layer, memo key, choice) of native layers without room
        self._native: bool | None = None
        self.building = False  # the native kernel is being built in the background: layers run F.conv2d
        self.unavailable: str | None = None  # why the native kernel cannot run here

    @property
    def native(self) -> bool:
        """Whether the native kernel runs. Decided at first use, and again as each run starts while the kernel
        builds in the background: a run never waits for that build (its layers run F.conv2d meanwhile)."""
        if self._native is None:
            self._native = self._kernel_ready()
        return self._native

    def _kernel_ready(self) -> bool:
        self.building, self.unavailable = False, None
        if self.cfg.kernel == "pytorch":
            return False
        from ....cpukernels import native as kernel

        state = kernel.kernel_state()  # starts the build (once per machine) where there is none
        self.building = state == "building"
        if state == "unavailable":
            self.unavailable = kernel.error()
        return state == "ready"

    def start_run(self, run: RunContext) -> bool:
        """Attach `run` and say in it which kernel runs; True when the native kernel became ready since the last
        run (the plan then starts over: choices, calibration table and pending filter room)."""
        self.run = run
        was_building = self.building
        if was_building:
            self._native = None
        switched = self.native and was_building
        if was_building and not self.building:  # built, or failed: the F.conv2d stand-ins are no plan
            self.memo.clear()
            self.storage.clear()
            self._calibration = None
        if switched:
            run.note("winograd: the native kernel finished building in the background; this run uses it")
        if self.building:
            run.counters["winograd_native_building"] = 1
            run.note(BUILDING_NOTE)
        elif self.unavailable is not None:
            run.note(f"winograd: native kernel unavailable ({self.unavailable}); the PyTorch Winograd runs")
        return switched

    @property
    def fused(self) -> bool:
        """Whether the PyTorch Winograd runs its compiled transforms (asked for, and they build here)."""
        from ....cpukernels.fused import fused_transforms_work

        return not self.native and self.cfg.fused_transforms and fused_transforms_work()

    @property
    def calibration(self):
        if self._calibration is None:
            from ....cpukernels.calibrate import Calibration

            native = self.native
            self._calibration = Calibration(self.calibration_dir, fused=not native and self.fused, native=native)
        return self._calibration

    def __call__(self, layer, x: torch.Tensor):
        from ....cpukernels.winograd import is_channels_last

        channels_last = is_channels_last(x)
        key = (id(layer), tuple(x.shape), x.dtype, x.device, channels_last)
        choice = self.memo.get(key)
        if choice is None:
            choice = self._decide(layer, x.shape, x.dtype, x.device, channels_last, key)
            self.memo[key] = choice
        if self.run is not None:
            self.run.count("winograd_conv2d_calls" if choice[0] == "conv2d" else "winograd_calls")
        return choice

    def allocate_storage(self) -> int:
        """Give the filter budget to the native layers planned so far, most time saved per MB first; returns how
        many layers now keep their filters. Called between runs (a layer's first run transforms on the fly)."""
        kept = 0
        for saving, nbytes, layer, key, choice in sorted(self.storage, key=lambda e: e[0] / e[1], reverse=True):
            if layer.reserve(choice[1]):
                self.memo[key] = choice
                kept += 1
        self.storage.clear()
        return kept

    def _native_choice(self, layer, choice, key, kept: tuple | None):
        """Run `choice` with its filters transformed on the fly, and offer the budget `kept` = (saving, the
        choice to run with kept filters)."""
        from ....cpukernels.winograd import filter_bytes

        if kept is not None:
            saving, stored = kept
            self.storage.append((saving, filter_bytes(layer.out_channels, layer.in_channels, stored[1]), layer, key,
                                 stored))
        return choice

    def _decide(self, layer, shape, dtype, device, channels_last: bool, key=None):
        if dtype != torch.float32:
            return ("conv2d", 0, 0)  # documented: fp16/bf16 Winograd loses too many digits; use F.conv2d
        if not self.native and self.building:
            # no calibration either: measured next to a compiler it would be wrong, and kept on disk
            return ("conv2d", 0, 0)
        n, c, h, w = shape
        if self.cfg.tile != "auto":
            m = int(self.cfg.tile[1:])
            if self.native:
                from ....cpukernels.calibrate import BY_CHANNELS_MAX_BYTES

                tiles = n * -(-(h + 2 * layer.pad - 2) // m) * -(-(w + 2 * layer.pad - 2) // m)
                by_channels = tiles < 256 and (m + 2) ** 2 * tiles * c * 4 <= BY_CHANNELS_MAX_BYTES
                choice = ("native", m, -32 if by_channels else 32)
                return self._native_choice(layer, choice, key, (1e-9, choice))
            return ("winograd", m, 0) if layer.reserve(m) else ("conv2d", 0, 0)
        calibration, k = self.calibration, layer.out_channels
        progress, timings = None, None
        known = calibration.known(n, c, k, h, w, layer.pad, dtype, device, channels_last)
        borrowed = None if known else calibration.other_batch(n, c, k, h, w, layer.pad, dtype, device, channels_last)
        if borrowed is not None:
            log.info("winograd: N%d C%d->K%d %dx%d runs as measured at batch %d", n, c, k, h, w, borrowed[0])
            timings = borrowed[1]
            if self.run is not None:
                self.run.count("winograd_shapes_from_another_batch")
        elif not known:
            what = (f"measuring Winograd on this CPU for N{n} C{c}->K{k} {h}x{w}"
                    f"{' channels-last' if channels_last else ''} (first use of this shape; kept for next time)")
            log.info("winograd: %s", what)
            run = self.run

            def progress(done: int, total: int) -> None:
                if run is not None:
                    run.busy(what, done, total)

        before = calibration.measured_s
        if timings is None:
            timings = calibration.timings(n, c, k, h, w, layer.pad, dtype, device, channels_last, progress=progress)
        if self.run is not None and calibration.measured_s > before:
            self.run.count("winograd_calibration_s", round(calibration.measured_s - before, 3))
            self.run.count("winograd_calibrated_shapes")
        from ....cpukernels.calibrate import ranked_choices, stored_alternative

        # fastest first; a PyTorch-Winograd tile whose filters find no room falls to the next candidate, a native
        # one runs with its filters transformed on the fly until the budget gives it room
        for choice in ranked_choices(timings):
            kind, m, band = choice
            if kind == "native":
                return self._native_choice(layer, choice, key, stored_alternative(timings, choice))
            if kind == "conv2d" or layer.reserve(m):
                return choice
        return ("conv2d", 0, 0)


def default_filter_budget_mb(native: bool = False) -> int:
    """The automatic filter budget. PyTorch Winograd (which needs every filter kept to pay): the smallest of 8 GiB,
    30% of physical memory and 40% of the memory still available once the model is loaded (SD1.5's UNet and VAE
    take 7.2 GiB of filters on a 24 GB machine, while next to SDXL's 10 GB UNet the 30% rule alone ran the same
    machine out of memory). Native kernel (which runs without them): at most 1 GiB, 10% of physical memory and
    25% of what is available."""
    cap, share, left = (2**30, 0.1, 0.25) if native else (8 * 2**30, 0.3, 0.4)
    budget = min(cap, total_memory_bytes() * share)
    available = available_memory_bytes()
    if available is not None:
        budget = min(budget, available * left)
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
        budget_mb = cfg.filter_cache_mb or default_filter_budget_mb(native=planner.native)
        cache = FilterCache(budget_mb * 2**20)  # shared by every module
        patched = []
        for name in ("unet", "vae"):
            if getattr(cfg, name) and getattr(pipe, name, None) is not None:
                patched.append(patch_convs(getattr(pipe, name), planner, cache))
        for p in reversed(patched):
            patch.on_remove(p.restore)
        patch.info.update(planner=planner, patched=patched, cache=cache,
                          layers=sum(len(p.swaps) for p in patched))
        log.info("winograd: %d convolutions can switch to Winograd (tile %s)", patch.info["layers"], cfg.tile)

    def run_scope(self, cfg: WinogradConfig, handle, run: RunContext):
        planner: WinogradPlanner = handle.info["planner"]

        @contextmanager
        def scope():
            if planner.start_run(run) and not cfg.filter_cache_mb:
                handle.info["cache"].budget = default_filter_budget_mb(native=True) * 2**20
            if planner.storage:
                kept = planner.allocate_storage()
                if kept:
                    run.count("winograd_layers_given_filter_room", kept)
            try:
                yield
            finally:
                planner.run = None
                if handle.info["patched"]:
                    run.counters["winograd_filter_cache_mb"] = round(handle.info["cache"].used / 2**20, 1)
                run.counters["winograd_native_kernel"] = int(planner.native)

        return scope()
