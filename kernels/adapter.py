"""A Conv2d that runs Winograd when its plan says so, and a reversible patcher that swaps it in.

`WinogradConv2d` is a `torch.nn.Conv2d` sharing the original layer's parameters (same objects,
same state-dict keys, `isinstance(..., Conv2d)` still true for hosts and LoRA loaders); it keeps the
original module for `restore()`. Its transformed filters are cached per tile size and recomputed
when the weight changes (a LoRA patching it in place, a dtype or device move).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .winograd import (
    conv_padding,
    filter_bytes,
    filter_transform,
    is_eligible,
    pack_filters,
    release_workspaces,
    thread_workspace,
    winograd_conv2d,
)

# What to run for an input: ("conv2d", 0, 0) or ("winograd", tile m, band tiles (0 = whole image)).
# A planner is called as planner(layer, x) for the input tensor x; one with a true `fused` attribute has
# chosen with the compiled transforms (kernels/fused.py), which the layer then runs.
Choice = tuple[str, int, int]
Planner = Callable[["WinogradConv2d", torch.Tensor], Choice]


def _stamp(weight: torch.Tensor) -> tuple:
    try:
        version = weight._version
    except RuntimeError:  # inference tensors carry no version counter
        version = -1
    return weight.data_ptr(), version, weight.dtype, weight.device, tuple(weight.shape)


class FilterCache:
    """The memory budget every patched layer's transformed filters share, reserved when a layer is planned.

    Winograd pays only with its filters transformed ahead of time, so a layer that finds no room stays on
    F.conv2d instead of re-transforming on every call.
    """

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self.peak = 0
        self.refused = 0

    def reserve(self, nbytes: int) -> bool:
        if self.used + nbytes > self.budget:
            self.refused += 1
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes


class WinogradConv2d(torch.nn.Conv2d):
    """Drop-in replacement for an eligible 3x3 stride-1 Conv2d (see `is_eligible`)."""

    def __init__(self, conv: torch.nn.Conv2d, planner: Planner, cache: FilterCache):
        if not is_eligible(conv):
            raise ValueError(f"{conv} is not a 3x3 stride-1 dense convolution")
        torch.nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(conv, name))
        self.weight = conv.weight  # the very same Parameter objects: keys, sharing and LoRA patches unchanged
        self.bias = conv.bias
        object.__setattr__(self, "original", conv)
        object.__setattr__(self, "planner", planner)
        object.__setattr__(self, "filter_cache", cache)
        self.pad = conv_padding(conv)
        self._filters: dict[int, tuple] = {}  # m -> (weight stamp, U or empty, packed or None)
        self._reserved: dict[int, int] = {}  # m -> bytes reserved in the shared budget
        self.calls = {"conv2d": 0, "winograd": 0}

    def reserve(self, m: int) -> bool:
        """Reserve room for this layer's tile-m filters (once per tile); False if the budget is spent."""
        if m in self._reserved:
            return True
        nbytes = filter_bytes(self.out_channels, self.in_channels, m, self.weight.element_size())
        if not self.filter_cache.reserve(nbytes):
            return False
        self._reserved[m] = nbytes
        return True

    def filters(self, m: int, rows_hint: int) -> tuple[torch.Tensor, list | None]:
        """(U = G g G^T for tile m, its oneDNN-packed form or None), kept until the weight changes (a LoRA,
        a dtype or device move). Only the form the products use is kept."""
        stamp = _stamp(self.weight)
        entry = self._filters.get(m)
        if entry is not None and entry[0] == stamp:
            return entry[1], entry[2]
        u = filter_transform(self.weight.detach(), m)
        packed = pack_filters(u, rows_hint)
        if m in self._reserved:
            self._filters[m] = (stamp, u if packed is None else u[:0], packed)
        return u, packed

    def drop_filters(self) -> None:
        for nbytes in self._reserved.values():
            self.filter_cache.release(nbytes)
        self._reserved.clear()
        self._filters.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            self.calls["conv2d"] += 1  # the transformed filters carry no gradient: training stays on F.conv2d
            return self._conv_forward(x, self.weight, self.bias)
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            # being compiled (torch.compile) or traced for OpenVINO: the compiler picks its own conv algorithm
            self.calls["conv2d"] += 1
            return self._conv_forward(x, self.weight, self.bias)
        kind, m, band = self.planner(self, x)
        if kind != "winograd":
            self.calls["conv2d"] += 1
            return self._conv_forward(x, self.weight, self.bias)
        self.calls["winograd"] += 1
        tiles_w = -(-(x.shape[-1] + 2 * self.pad - 2) // m)
        tiles_h = -(-(x.shape[-2] + 2 * self.pad - 2) // m)
        u, packed = self.filters(m, x.shape[0] * (band or tiles_h) * tiles_w)
        return winograd_conv2d(x, u, self.bias, m=m, padding=self.pad, band_tiles=band or None, packed=packed,
                               workspace=thread_workspace(), fused=bool(getattr(self.planner, "fused", False)))


@dataclass
class PatchedConvs:
    """What `patch_convs` changed; `restore()` puts every original Conv2d back."""

    module: torch.nn.Module
    swaps: list  # (parent, child name, original conv, adapter)
    cache: FilterCache

    def adapters(self) -> list[WinogradConv2d]:
        return [s[3] for s in self.swaps]

    def restore(self) -> None:
        for parent, name, original, adapter in reversed(self.swaps):
            adapter.drop_filters()
            parent._modules[name] = original
        self.swaps.clear()
        if self.cache.used == 0:  # the last patch sharing this budget is gone
            release_workspaces()


def patch_convs(module: torch.nn.Module, planner: Planner, cache: FilterCache,
                select: Callable[[str, torch.nn.Conv2d], bool] | None = None) -> PatchedConvs:
    """Swap every eligible Conv2d under `module` (optionally filtered by `select(name, conv)`) for a
    WinogradConv2d sharing its parameters and the filter `cache`. Reversible with `.restore()`."""
    swaps = []
    for parent_name, parent in list(module.named_modules()):
        for name, child in list(parent._modules.items()):
            if child is None or type(child) is not torch.nn.Conv2d or not is_eligible(child):
                continue
            full = f"{parent_name}.{name}" if parent_name else name
            if select is not None and not select(full, child):
                continue
            adapter = WinogradConv2d(child, planner, cache)
            adapter.train(child.training)
            parent._modules[name] = adapter
            swaps.append((parent, name, child, adapter))
    return PatchedConvs(module, swaps, cache)
