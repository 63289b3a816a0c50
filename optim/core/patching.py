"""SDAccel's symmetric patch registry: every change an optimization makes is logged with its inverse.

Each optimization applied to a pipeline owns one `PatchSet`, registered on the pipeline under the
optimization's name. Adding a name twice is an error; removing undoes every change in reverse order,
so removal is symmetric by construction. (diffusers' own hook registry is absent from 0.31, which
A1111 Forge pins, so SDAccel keeps this small one.)

Sets may be removed in any order. Two sets can patch the same attribute (DeepCache and compile both
replace `unet.forward`), so undoing a middle set alone would restore a value a later set saw; instead
the later sets are rewound (undone newest first), the middle one is undone, and the later ones are
applied again in order, as diffusers' HookRegistry re-links its chain when a middle hook goes.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..spec.errors import AlreadyAppliedError, SDAccelError

log = logging.getLogger(__name__)

_REGISTRY_ATTR = "_sdaccel_patches"
_MISSING = object()
_WIDENING = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float64),
             (torch.float16, torch.float64), (torch.bfloat16, torch.float64)}


class OutOfOrderRemovalError(SDAccelError):
    """A patch set applied after the one being removed cannot be applied again, so nothing was removed."""

    def __init__(self, name: str, blockers: list[str]):
        self.name, self.blockers = name, blockers
        super().__init__(f"cannot remove {name} while {', '.join(blockers)} (applied after it, and not "
                         f"re-appliable) is installed: remove {', '.join(reversed(blockers))} first")


class PatchSet:
    """The undo log of one optimization on one pipeline; `remove()` restores the exact prior state.

    `reapply`, when set (Unit.apply sets it), records the same changes again into this set; it is what
    lets a set applied earlier be removed first (see the module docstring).
    """

    def __init__(self, name: str, owner=None):
        self.name = name
        self.owner = owner
        self._undo: list[Callable[[], None]] = []
        self._held: list[torch.Tensor] = []
        self.removed = False
        self.info: dict = {}
        self.reapply: Callable[[], None] | None = None

    # -- recording primitives
    def on_remove(self, undo: Callable[[], None]) -> None:
        """Register an inverse action run (in reverse order) by `remove()`."""
        self._undo.append(undo)

    def set_attr(self, obj, attr: str, value) -> None:
        """Set `obj.attr = value`, restoring the old value (or its absence) on removal."""
        old = obj.__dict__.get(attr, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, attr, _MISSING)
        setattr(obj, attr, value)

        def undo():
            if old is _MISSING:
                try:
                    delattr(obj, attr)
                except AttributeError:
                    pass
            else:
                setattr(obj, attr, old)

        self._undo.append(undo)

    def keep_attributes(self, module: torch.nn.Module) -> None:
        """Restore the plain attributes of `module` and its sub-modules as they are now, after every undo
        registered later has run.

        For changes made by third-party hook libraries (accelerate, diffusers' HookRegistry): their own
        removal puts `forward` back as an instance attribute and leaves registries behind, which other
        units read as "someone replaced the forward". Parameters, buffers and children are not touched.
        """
        saved = [(sub, dict(sub.__dict__)) for sub in module.modules()]

        def undo():
            for sub, before in saved:
                for key in [k for k in sub.__dict__ if k not in before]:
                    del sub.__dict__[key]
                for key, value in before.items():
                    if sub.__dict__.get(key, _MISSING) is not value:
                        sub.__dict__[key] = value

        self._undo.append(undo)

    def add_hook(self, handle) -> None:
        """Remember a torch hook handle so removal detaches it."""
        self._undo.append(handle.remove)

    def convert_tensors(self, module: torch.nn.Module, *, dtype=None, device=None, memory_format=None,
                        only=None) -> None:
        """Move/cast every parameter and buffer of `module`, restorable bit for bit.

        Widening casts on the same device are undone by casting back (exact), so no second copy is
        kept; anything else keeps a reference to the original tensor and restores it by identity.
        """
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for key, tensor in list(store.items()):
                    if tensor is None or (only is not None and not only(sub, key, tensor)):
                        continue
                    self._convert_one(store, key, tensor, dtype, device, memory_format)

    def _convert_one(self, store, key, tensor, dtype, device, memory_format):
        data = tensor.data
        target_dtype = dtype if (dtype is not None and data.is_floating_point()) else data.dtype
        target_device = torch.device(device) if device is not None else data.device
        new = data
        if target_dtype != data.dtype or target_device != data.device:
            new = data.to(device=target_device, dtype=target_dtype)
        if memory_format is not None and new.dim() == 4:
            new = new.contiguous(memory_format=memory_format)
        if new is data:
            return
        is_param = isinstance(tensor, torch.nn.Parameter)
        exact_back = data.device == new.device and data.is_contiguous() and (
            data.dtype == new.dtype or (data.dtype, new.dtype) in _WIDENING)
        if is_param:
            tensor.data = new
        else:
            store[key] = new
        if exact_back:
            old_dtype = data.dtype

            def undo(store=store, key=key, old_dtype=old_dtype, is_param=is_param):
                current = store[key]
                restored = current.data.to(dtype=old_dtype).contiguous()
                if is_param:
                    current.data = restored
                else:
                    store[key] = restored
        else:
            self._held.append(data)

            def undo(store=store, key=key, data=data, is_param=is_param):
                if is_param:
                    store[key].data = data
                else:
                    store[key] = data

        self._undo.append(undo)

    def hold(self, tensors) -> None:
        """Count tensors kept alive only so removal can put them back (e.g. a swapped-out module's weights)."""
        self._held.extend(tensors)

    def held_bytes(self) -> int:
        """Memory kept alive only so that removal can restore originals."""
        return sum(t.numel() * t.element_size() for t in self._held)

    # -- removal
    def remove(self) -> None:
        """Undo every recorded change in reverse order and unregister from the owner.

        Sets applied after this one are rewound first and applied again afterwards. Every undo runs even
        if one fails; failures are reported together after.
        """
        if self.removed:
            return
        later = self._later_sets()
        blockers = [p.name for p in later if p.reapply is None]
        if blockers:
            raise OutOfOrderRemovalError(self.name, blockers)
        errors = []
        for patch in reversed(later):
            errors += patch._rewind()
        errors += self._rewind()
        self._unregister()
        for patch in later:
            if errors:  # the state is not what the later set was applied to: leave it removed
                patch._unregister()
                continue
            try:
                patch.reapply()
            except Exception as exc:
                errors.append(exc)
                errors += patch._rewind()
                patch._unregister()
        if errors:
            raise RuntimeError(f"removing {self.name} failed to restore {len(errors)} change(s): "
                               + "; ".join(f"{type(e).__name__}: {e}" for e in errors)) from errors[0]

    def _later_sets(self) -> list["PatchSet"]:
        if self.owner is None:
            return []
        sets = list(installed(self.owner).values())
        return sets[sets.index(self) + 1:] if self in sets else []

    def _rewind(self) -> list[Exception]:
        """Run the undo log newest first, collecting failures; the set stays registered."""
        errors = []
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception as exc:  # keep undoing; report after
                errors.append(exc)
        self._undo.clear()
        self._held.clear()
        return errors

    def _unregister(self) -> None:
        self.removed = True
        if self.owner is not None:
            registry(self.owner).pop(self.name, None)
            if not registry(self.owner):
                try:
                    object.__delattr__(self.owner, _REGISTRY_ATTR)
                except AttributeError:
                    pass


def registry(obj) -> dict[str, PatchSet]:
    """The patch sets installed on `obj` (a pipeline or module), by name, in install order."""
    reg = obj.__dict__.get(_REGISTRY_ATTR)
    if reg is None:
        reg = {}
        object.__setattr__(obj, _REGISTRY_ATTR, reg)
    return reg


def installed(obj) -> dict[str, PatchSet]:
    """Read-only view: installed patch sets, without creating a registry."""
    return dict(obj.__dict__.get(_REGISTRY_ATTR, {}))


def new_patchset(obj, name: str) -> PatchSet:
    """Start a patch set named `name` on `obj`; refuses a name already installed."""
    reg = registry(obj)
    if name in reg:
        raise AlreadyAppliedError(f"{name} is already applied to this pipeline; remove it first (or build a new "
                                  "spec with different settings)")
    patch = PatchSet(name, owner=obj)
    reg[name] = patch
    return patch
