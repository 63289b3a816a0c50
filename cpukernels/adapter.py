"""A Conv2d that runs Winograd when its plan says so, and a reversible patcher that swaps it in.

`WinogradConv2d` is a `torch.nn.Conv2d` sharing the original layer's parameters (same objects,
same state-dict keys, `isinstance(..., Conv2d)` still true for hosts and LoRA loaders); it keeps the
original module for `restore()`. Its transformed filters are cached per tile size and recomputed
when the weight changes (a LoRA patching it in place, a dtype or device move).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from .winograd import (
    conv_padding,
    filter_bytes,
    filter_transform,
    is_eligible,
    native_conv2d,
    pack_filters,
    release_workspaces,
    thread_workspace,
    winograd_conv2d,
)

# What to run for an input: ("conv2d", 0, 0), ("winograd", tile m, band tiles (0 = whole image)) for the PyTorch
# Winograd, or ("native", tile m, block) for the native kernel (block > 0: blocks of that many output tiles; < 0:
# chunks of -block output channels). A planner is called as planner(layer, x) for the input tensor x; one with a
# true `fused` attribute has chosen with the compiled transforms (cpukernels/fused.py), which the layer then runs.
# A native layer runs with its transformed filters kept when it holds room for them (`reserve`), else with the
# filters transformed inside each call from the weight of that call.
Choice = tuple[str, int, int]
Planner = Callable[["WinogradConv2d", torch.Tensor], Choice]


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


def _version(weight: torch.Tensor) -> int:
    try:
        return weight._version
    except RuntimeError:  # inference tensors carry no version counter
        return -1


class _Stamp:
    """Which weight a layer's filters were made from: the tensor object itself (held weakly) and its in-place
    version. An address is not enough: a host that swaps in a LoRA-patched weight and frees the previous one
    often gets the same memory back for the next."""

    __slots__ = ("ref", "version", "dtype", "device")

    def __init__(self, source: torch.Tensor, used: torch.Tensor):
        self.ref = weakref.ref(source)
        self.version = _version(source)
        self.dtype, self.device = used.dtype, used.device

    def matches(self, source: torch.Tensor, used: torch.Tensor) -> bool:
        return (self.ref() is source and self.version == _version(source) and self.dtype == used.dtype
                and self.device == used.device)


class _Filters:
    """One layer's transformed filters per tile size, and its share of the FilterCache budget."""

    def __init__(self, out_channels: int, in_channels: int, cache: FilterCache):
        self.out_channels, self.in_channels, self.cache = out_channels, in_channels, cache
        self.by_tile: dict[int, tuple] = {}  # m -> (stamp, U or empty, packed or None)
        self.reserved: dict[int, int] = {}  # m -> bytes reserved in the shared budget

    def reserve(self, m: int, element_size: int) -> bool:
        if m in self.reserved:
            return True
        nbytes = filter_bytes(self.out_channels, self.in_channels, m, element_size)
        if not self.cache.reserve(nbytes):
            return False
        self.reserved[m] = nbytes
        return True

    def get(self, m: int, rows_hint: int, source: torch.Tensor, used: torch.Tensor):
        """(U for tile m, its packed form or None) for the weight `used`, made from `source` (the same tensor,
        or a host's per-call cast of it); remade once `source` is replaced or changed in place."""
        entry = self.by_tile.get(m)
        if entry is not None and entry[0].matches(source, used):
            return entry[1], entry[2]
        u = filter_transform(used.detach(), m)
        packed = pack_filters(u, rows_hint)
        if m in self.reserved:
            # with packed filters only their shape is needed from U: a fresh empty tensor, not a view (`u[:0]` would
            # keep all of U's storage alive beside the packed copy, twice the filter memory the budget counts)
            kept = u if packed is None else u.new_empty((0, *u.shape[1:]))
            self.by_tile[m] = (_Stamp(source, used), kept, packed)
        return u, packed

    def native(self, m: int, source: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        """The native kernel's filters for tile m when this layer holds room for them, else the weight `used`
        itself (transformed on the fly inside the call). Remade once `source` is replaced or changed in place."""
        if m not in self.reserved:
            return used.detach()
        entry = self.by_tile.get(m)
        if entry is not None and entry[0].matches(source, used):
            return entry[1]
        from .native import native_ops

        u = native_ops(build=False).transform_filters(used.detach().float(), m, False)
        self.by_tile[m] = (_Stamp(source, used), u, None)
        return u

    def drop(self) -> None:
        for nbytes in self.reserved.values():
            self.cache.release(nbytes)
        self.reserved.clear()
        self.by_tile.clear()


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
        object.__setattr__(self, "_filters", _Filters(conv.out_channels, conv.in_channels, cache))
        self.calls = {"conv2d": 0, "winograd": 0}

    def reserve(self, m: int) -> bool:
        """Reserve room for this layer's tile-m filters (once per tile); False if the budget is spent."""
        return self._filters.reserve(m, self.weight.element_size())

    def filters(self, m: int, rows_hint: int) -> tuple[torch.Tensor, list | None]:
        """(U = G g G^T for tile m, its oneDNN-packed form or None), kept until the weight changes (a LoRA,
        a dtype or device move). Only the form the products use is kept."""
        return self._filters.get(m, rows_hint, self.weight, self.weight)

    def drop_filters(self) -> None:
        self._filters.drop()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            self.calls["conv2d"] += 1  # the transformed filters carry no gradient: training stays on F.conv2d
            return self._conv_forward(x, self.weight, self.bias)
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            # being compiled (torch.compile) or traced for OpenVINO: the compiler picks its own conv algorithm
            self.calls["conv2d"] += 1
            return self._conv_forward(x, self.weight, self.bias)
        kind, m, band = self.planner(self, x)
        if kind == "native":
            self.calls["winograd"] += 1
            return native_conv2d(x, self._filters.native(m, self.weight, self.weight), self.bias, m=m,
                                 padding=self.pad, block=band)
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


# -- hooks: Winograd on a host's own Conv2d layers, without replacing them ---------------------------------------
# A host such as ComfyUI patches weights by walking attribute paths (LoRAs, model merges) and casts them per call;
# a replaced module would take those patches instead of the host's layer. A hook leaves the module tree alone:
# it is the layer's instance `forward` while installed, and asks `weights(conv, x)` which weight and bias the
# host would use for this call.
Weights = Callable[[torch.nn.Conv2d, torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None] | None"]


def own_weights(conv: torch.nn.Conv2d, x: torch.Tensor):
    """The plain torch rule: the layer's own weight and bias."""
    return conv.weight, conv.bias


class WinogradHook:
    """Runs one Conv2d through Winograd while installed as its `forward`; filters outlive an install."""

    def __init__(self, conv: torch.nn.Conv2d, planner: Planner, cache: FilterCache, weights: Weights = own_weights):
        if not is_eligible(conv):
            raise ValueError(f"{conv} is not a 3x3 stride-1 dense convolution")
        self.conv = conv
        self.planner = planner
        self.weights = weights
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.pad = conv_padding(conv)
        self._filters = _Filters(conv.out_channels, conv.in_channels, cache)
        self.calls = {"conv2d": 0, "winograd": 0, "host": 0}
        self._previous = None

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def reserve(self, m: int) -> bool:
        return self._filters.reserve(m, self.conv.weight.element_size())

    def _host_forward(self, x):
        previous = self._previous
        return previous(x) if previous is not None else type(self.conv).forward(self.conv, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)) or \
                torch.compiler.is_compiling() or torch.jit.is_tracing():
            self.calls["host"] += 1  # training, or a compiler choosing its own convolution
            return self._host_forward(x)
        used = self.weights(conv, x)
        if used is None:  # the host makes this call's weight itself (a LoRA applied on the fly): leave it to it
            self.calls["host"] += 1
            return self._host_forward(x)
        weight, bias = used
        kind, m, band = self.planner(self, x)
        if kind == "native":
            self.calls["winograd"] += 1
            return native_conv2d(x, self._filters.native(m, conv.weight, weight), bias, m=m, padding=self.pad,
                                 block=band)
        if kind != "winograd":
            self.calls["conv2d"] += 1
            return conv._conv_forward(x, weight, bias)
        self.calls["winograd"] += 1
        tiles_w = -(-(x.shape[-1] + 2 * self.pad - 2) // m)
        tiles_h = -(-(x.shape[-2] + 2 * self.pad - 2) // m)
        u, packed = self._filters.get(m, x.shape[0] * (band or tiles_h) * tiles_w, conv.weight, weight)
        return winograd_conv2d(x, u, bias, m=m, padding=self.pad, band_tiles=band or None, packed=packed,
                               workspace=thread_workspace(), fused=bool(getattr(self.planner, "fused", False)))

    def install(self) -> None:
        self._previous = self.conv.__dict__.get("forward")
        self.conv.forward = self.forward

    def uninstall(self) -> None:
        """Put back whatever `forward` the layer had. Raises if another patch replaced the forward since:
        taking ours out would silently drop theirs."""
        current = self.conv.__dict__.get("forward")
        if current != self.forward:
            raise RuntimeError(f"another patch replaced the forward of {self.conv} after SDAccel's Winograd hook; "
                               "remove that patch first")
        if self._previous is None:
            del self.conv.forward
        else:
            self.conv.forward = self._previous
        self._previous = None


@dataclass
class HookedConvs:
    """Winograd hooks over every eligible Conv2d of a module: `installed()` for one run, `drop()` at the end."""

    module: torch.nn.Module
    hooks: list
    cache: FilterCache

    def install(self) -> None:
        done = []
        try:
            for hook in self.hooks:
                hook.install()
                done.append(hook)
        except BaseException:
            for hook in reversed(done):
                hook.uninstall()
            raise

    def uninstall(self) -> None:
        for hook in reversed(self.hooks):
            hook.uninstall()

    def drop(self) -> None:
        """Free every transformed filter (the hooks stay usable and remake them)."""
        for hook in self.hooks:
            hook._filters.drop()
        if self.cache.used == 0:
            release_workspaces()

    def calls(self) -> dict:
        total = {"conv2d": 0, "winograd": 0, "host": 0}
        for hook in self.hooks:
            for name, n in hook.calls.items():
                total[name] += n
        return total


def hook_convs(module: torch.nn.Module, planner: Planner, cache: FilterCache, weights: Weights = own_weights,
               select: Callable[[str, torch.nn.Conv2d], bool] | None = None) -> HookedConvs:
    """Hooks (not yet installed) for every eligible Conv2d under `module`, subclasses included (a host's own
    Conv2d classes), optionally filtered by `select(name, conv)`."""
    hooks = []
    for name, child in module.named_modules():
        if not isinstance(child, torch.nn.Conv2d) or isinstance(child, WinogradConv2d) or not is_eligible(child):
            continue
        if select is not None and not select(name, child):
            continue
        hooks.append(WinogradHook(child, planner, cache, weights))
    return HookedConvs(module, hooks, cache)
