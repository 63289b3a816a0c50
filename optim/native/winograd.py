"""Winograd on a host's UNet: hooks on its own 3x3 convolutions, installed for one run at a time.

The host's layers stay in place (a host patching weights by attribute path still reaches them); each hook asks
the host adapter which weight this call uses, and its transformed filters are remade once that weight is
replaced (a LoRA at another strength) or changed in place. Filters outlive a run, so re-queuing with the same
weights transforms nothing.
"""

from __future__ import annotations

from contextlib import contextmanager

from ...cpukernels.adapter import FilterCache, HookedConvs, Weights, hook_convs, own_weights
from ..core.registry import RunContext
from ..units.winograd.config import WinogradConfig
from ..units.winograd.unit import WinogradPlanner, default_filter_budget_mb
from .ldm import find_ldm_unet


class NativeWinograd:
    """One patch's Winograd state: planner, filter budget and the hooks of the UNet it last ran on."""

    def __init__(self, cfg: WinogradConfig, weights: Weights = own_weights):
        self.cfg = cfg
        self.weights = weights
        self.planner = WinogradPlanner(cfg, cfg.calibration_dir or None)
        self.cache: FilterCache | None = None  # sized at the first run, once the host has loaded its model
        self.hooked: HookedConvs | None = None

    def _hooks_for(self, unet) -> HookedConvs:
        if self.cache is None:
            # a host loads (and casts) its weights when sampling starts, not when the patch node runs: an
            # automatic budget taken earlier counts memory the model is about to fill
            budget_mb = self.cfg.filter_cache_mb or default_filter_budget_mb(native=self.planner.native)
            self.cache = FilterCache(budget_mb * 2**20)
        if self.hooked is None or self.hooked.module is not unet:
            if self.hooked is not None:
                self.hooked.drop()
            self.hooked = hook_convs(unet, self.planner, self.cache, self.weights)
        return self.hooked

    @contextmanager
    def run(self, model, run: RunContext):
        """Winograd on `model`'s LDM UNet for the block; every hook is gone afterwards, even on an error."""
        # first: which kernel this run uses (a native kernel built in the background since the last run is picked
        # up here; the automatic filter budget then becomes the native kernel's)
        if self.planner.start_run(run) and self.cache is not None and not self.cfg.filter_cache_mb:
            self.cache.budget = default_filter_budget_mb(native=True) * 2**20
        try:
            hooked = self._hooks_for(find_ldm_unet(model, "SDAccel Winograd"))
            before = hooked.calls()
            hooked.install()
        except BaseException:
            self.planner.run = None
            raise
        if self.planner.storage:
            kept = self.planner.allocate_storage()
            if kept:
                run.count("winograd_layers_given_filter_room", kept)
        try:
            yield hooked
        finally:
            self.planner.run = None
            hooked.uninstall()
            after = hooked.calls()
            run.counters["winograd_layers"] = len(hooked.hooks)
            for name in after:
                run.counters[f"winograd_{name}_calls"] = after[name] - before[name]
            run.counters["winograd_filter_cache_mb"] = round(self.cache.used / 2**20, 1)
            run.counters["winograd_native_kernel"] = int(self.planner.native)

    def release(self) -> None:
        if self.hooked is not None:
            self.hooked.drop()


def winograd_summary(counters: dict) -> list[str]:
    """What a run's Winograd hooks did, as the lines a host adapter shows (node badge, console)."""
    if "winograd_layers" not in counters:
        return []
    kernel = "native kernel" if counters.get("winograd_native_kernel") else "PyTorch Winograd"
    if counters.get("winograd_native_building"):
        kernel = "F.conv2d while the native kernel builds"
    lines = [f"{counters.get('winograd_winograd_calls', 0)} Winograd and {counters.get('winograd_conv2d_calls', 0)} "
             f"F.conv2d calls over {counters['winograd_layers']} convolutions ({kernel}); "
             f"{counters.get('winograd_filter_cache_mb', 0)} MB of filters kept"]
    if counters.get("winograd_calibrated_shapes"):
        lines.append(f"measured {counters['winograd_calibrated_shapes']} new convolution shapes on this CPU in "
                     f"{counters.get('winograd_calibration_s', 0):.1f} s (once; kept for next time)")
    return lines
