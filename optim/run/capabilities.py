"""Probe what this machine can do (devices, native low precision, optional packages), never assume it.

Probes are functions called when needed, not at import; results are cached per process.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native(dtype_name: str) -> bool:
    """Whether this CPU computes `dtype_name` ("float16"/"bfloat16") natively rather than emulating it."""
    flags = cpu_flags()
    if platform.machine().lower() in ("arm64", "aarch64"):
        return dtype_name == "float16" and bool({"fphp", "asimdhp"} & flags) or \
            dtype_name == "bfloat16" and "bf16" in flags or platform.system() == "Darwin"
    if dtype_name == "bfloat16":
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    if dtype_name == "float16":
        return bool({"avx512_fp16", "amx_fp16"} & flags)
    return True


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def default_device() -> str:
    return "cuda" if cuda_available() else "mps" if mps_available() else "cpu"


def resolve_device(name: str):
    """torch.device for a spec's `device` field ("auto" picks CUDA, then MPS, then CPU)."""
    import torch

    from ..spec.errors import UnavailableError

    name = default_device() if name == "auto" else name
    if name.startswith("cuda") and not cuda_available():
        raise UnavailableError("device cuda", "PyTorch sees no CUDA GPU", "use device auto or cpu")
    if name == "mps" and not mps_available():
        raise UnavailableError("device mps", "PyTorch sees no Apple GPU", "use device auto or cpu")
    return torch.device(name)


def package_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def cpu_threads() -> int:
    import torch

    return torch.get_num_threads()


def machine_summary() -> dict:
    """What a benchmark row needs to name the machine it ran on."""
    import torch

    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "os": platform.platform()}
    from .allocator import allocator_summary

    info["allocator"] = allocator_summary()
    try:
        import diffusers
        import transformers

        info["diffusers"] = diffusers.__version__
        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if cuda_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def total_memory_bytes(default: int = 16 * 2**30) -> int:
    """Physical memory (`default` where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return default


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
