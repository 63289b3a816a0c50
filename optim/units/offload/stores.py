"""Where an idle component's weights wait: in CPU RAM (GPU runs) or in a file on disk (CPU runs).

`DeviceSwap` keeps the CPU tensors and copies them to the accelerator only while the component
works. `DiskSpill` writes the tensors to a file once and drops them from RAM while the component is
idle, reading them back when it is needed again: on a CPU-only machine that is what makes staging
lower the resident memory. Both restore the very tensors (or bit-identical ones) on `close()`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ...run.files import atomic_path

log = logging.getLogger(__name__)


def _tensor_slots(module):
    """(store, key) for every parameter and buffer of `module`, each storage once."""
    seen = set()
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for key, tensor in store.items():
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                yield store, key


def _assign(store, key, data):
    tensor = store[key]
    if isinstance(tensor, torch.nn.Parameter):
        tensor.data = data
    else:
        store[key] = data


class DeviceSwap:
    """Keep `module` on the CPU; `onload()` copies it to `device`, `offload()` drops the copy."""

    def __init__(self, module, device):
        self.module = module
        self.device = torch.device(device)
        self.home = [(store, key, store[key].data) for store, key in _tensor_slots(module)]
        self.resident = False

    def onload(self, non_blocking: bool = True) -> None:
        if self.resident:
            return
        with torch.inference_mode(False):  # normal tensors: weights must stay editable outside a run
            for store, key, data in self.home:
                # copy=True: a distinct copy even when `device` is where the data lives (how the CPU tests
                # see the swap); to another device .to() copies anyway
                _assign(store, key, data.to(self.device, non_blocking=non_blocking, copy=True))
        self.resident = True

    def offload(self) -> None:
        if not self.resident:
            return
        for store, key, data in self.home:
            _assign(store, key, data)
        self.resident = False

    def close(self) -> None:
        self.offload()


class DiskSpill:
    """Write `module`'s tensors to `path` once; `offload()` frees them from RAM, `onload()` reads them back."""

    def __init__(self, module, path: Path):
        self.module = module
        self.path = Path(path)
        self.slots = list(_tensor_slots(module))
        self.layout: list[tuple] = []  # (offset, nbytes, dtype, shape, channels_last)
        self.stamp = None
        self.resident = True

    def _current_stamp(self):
        return tuple((store[key].data.data_ptr(), store[key]._version) for store, key in self.slots)

    def _write(self) -> None:
        layout, offset = [], 0
        with atomic_path(self.path) as tmp, open(tmp, "wb") as fh:
            for store, key in self.slots:
                data = store[key].data
                cl = data.dim() == 4 and not data.is_contiguous() and \
                    data.is_contiguous(memory_format=torch.channels_last)
                flat = data.contiguous().view(-1)
                raw = flat.view(torch.uint8) if flat.numel() else flat
                nbytes = flat.numel() * flat.element_size()
                if nbytes:
                    fh.write(raw.numpy())
                layout.append((offset, nbytes, data.dtype, tuple(data.shape), cl))
                offset += nbytes
        self.layout = layout
        self.stamp = self._current_stamp()

    def offload(self) -> None:
        if not self.resident:
            return
        if self.stamp != self._current_stamp():  # first time, or weights changed (e.g. a LoRA) since
            self._write()
        for (store, key), (_, _, dtype, _, _) in zip(self.slots, self.layout):
            _assign(store, key, torch.empty(0, dtype=dtype))
        self.resident = False

    def onload(self) -> None:
        if self.resident:
            return
        with torch.inference_mode(False), open(self.path, "rb") as fh:
            for (store, key), (offset, nbytes, dtype, shape, cl) in zip(self.slots, self.layout):
                buf = bytearray(nbytes)
                fh.seek(offset)
                if fh.readinto(buf) != nbytes:
                    raise OSError(f"spill file {self.path} is shorter than expected")
                data = torch.frombuffer(buf, dtype=torch.uint8).view(dtype) if nbytes else torch.empty(0, dtype=dtype)
                data = data.reshape(shape)
                if cl:
                    data = data.contiguous(memory_format=torch.channels_last)
                _assign(store, key, data)
        self.resident = True
        self.stamp = self._current_stamp()

    def close(self) -> None:
        self.onload()
        try:
            os.remove(self.path)
        except OSError:
            pass
