"""Half precision and channels-last on a host's diffusion model, for one run at a time.

A host that casts fp32 weights to bf16 inside every layer call (ComfyUI's ModelComputeDtype) writes a bf16 copy
of every weight on every step; here the weights are converted once, when the run starts (with the host's LoRA
patches already in them), and the originals are put back by identity when it ends, so the same model bypassing
the node is bit for bit as before. The conversion goes through the engine's undo log (`PatchSet`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..core.patching import PatchSet
from ..core.registry import RunContext
from ..run.capabilities import cpu_has_native
from ..spec.errors import UnavailableError
from ..spec.fields import option

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_NATIVE_HALF = "this CPU has no native half precision (AVX512-BF16 or AMX), so the model stays in fp32"


@dataclass(frozen=True)
class ModelPrecisionConfig:
    """How a host's diffusion model is stored during a run."""

    dtype: str = option("half", "Weights and math during the run. half: bf16 on a CPU with native bf16 (AVX512-BF16 "
                        "or AMX; fp32 kept, with a note, on one without), fp16 on a GPU. bf16/fp16: that precision "
                        "(an error on a CPU that would emulate it: 10-40x slower). fp32: unchanged. Half precision "
                        "changes the image slightly (measured)", choices=("half", "bf16", "fp16", "fp32"))
    channels_last: bool = option(False, "Store the 4-D weights channels-last (NHWC) during the run: lossless; "
                                 "whether it is faster depends on the CPU (measured)")


def resolve_dtype(choice: str, device) -> tuple[torch.dtype, str]:
    """The dtype `choice` means on `device`, with a note when `half` has to keep fp32; a clear error for a half
    precision this CPU would only emulate."""
    kind = torch.device(device).type
    if choice == "half":
        if kind != "cpu":
            return torch.float16, ""
        return (torch.bfloat16, "") if cpu_has_native("bfloat16") else (torch.float32, NO_NATIVE_HALF)
    if choice not in DTYPES:
        raise UnavailableError("dtype", f"{choice!r} is not one of {', '.join(DTYPES)} or half",
                               "pick half, bf16, fp16 or fp32")
    dtype = DTYPES[choice]
    if kind == "cpu" and dtype != torch.float32 and not cpu_has_native(str(dtype).replace("torch.", "")):
        raise UnavailableError("dtype", f"this CPU has no native {choice}: it would be emulated, 10-40x slower "
                               "than fp32", "choose half (bf16 where the CPU has it, fp32 otherwise) or fp32")
    return dtype, ""


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextmanager
def converted(module: torch.nn.Module, run: RunContext, *, dtype: torch.dtype | None, channels_last: bool):
    """`module`'s floating tensors in `dtype` and its 4-D ones channels-last for the block, restored after it
    (even on an error or an interrupt); what it did goes into `run.counters`. The parameters stay the same
    objects; a narrowed tensor is put back by identity (the original is kept meanwhile), a relaid one by an
    exact copy (no second copy is kept)."""
    patch = PatchSet("sdaccel-model-precision")
    start = time.perf_counter()
    before = _weight_bytes(module)
    convs = sum(1 for p in module.parameters() if p.dim() == 4)
    try:
        patch.convert_tensors(module, dtype=dtype, memory_format=torch.channels_last if channels_last else None)
        run.counters["precision_weight_bytes_before"] = before
        run.counters["precision_weight_bytes"] = _weight_bytes(module)
        run.counters["precision_held_bytes"] = patch.held_bytes()  # originals kept to put back
        run.counters["precision_convert_s"] = round(time.perf_counter() - start, 3)
        run.counters["precision_channels_last_weights"] = convs if channels_last else 0
        yield
    finally:
        patch.remove()
