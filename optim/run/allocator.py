"""Keep freed memory in the process between UNet calls (glibc), so a CPU step stops paying for fresh pages.

glibc returns large freed blocks to the kernel (those above its mmap threshold, and the top of the
heap above the trim threshold), and moves that threshold with the process's history. A diffusion step
frees and re-allocates the same activations every call, so it then takes hundreds of thousands of
page faults per second: measured on a 2-core AMD EPYC during an SD1.5 256x256 step, about 200 000
faults/s and a fifth of the CPU time in the kernel. How much depends on what ran before, so two
identical configurations benchmarked one after the other differed by up to 30%. tcmalloc (the A1111
launcher's default on Linux) and jemalloc avoid this; with glibc, `mallopt` does: no mmap for large
blocks (every block comes from the heap and is reused) and no trimming. Process-wide: the peak
memory stays reserved by the process, which is why hosts opt in and `bench` always does (for
comparable rows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_STATE: dict = {}


def _libc():
    """glibc, opened once per process (find_library runs ldconfig)."""
    if "libc" not in _STATE:
        _STATE["libc"] = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return _STATE["libc"]


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep and reuse freed memory (see module docstring). True if applied; a no-op
    returning False elsewhere (macOS, Windows, musl), where the allocators already behave or differ."""
    if "applied" in _STATE:
        return _STATE["applied"]
    applied = False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = _libc()
            applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
        except (OSError, AttributeError) as exc:
            log.debug("mallopt unavailable: %s", exc)
    _STATE["applied"] = applied
    if applied:
        log.info("glibc malloc: freed memory is kept for reuse (no mmap blocks, no trimming)")
    return applied


def release_free_memory() -> None:
    """Give the heap's free memory back to the OS now (glibc `malloc_trim`): when a pipeline or a host's model is
    dropped, and before each benchmark row so its peak memory is its own. Also with glibc's defaults: their
    mmap threshold rises with the first large frees, so most of a model's tensors come from the heap and
    their pages stay with the process until trimmed (measured in A1111: 4 GB of freed weights, resident set
    down by 1 GB). A no-op off glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError) as exc:  # pragma: no cover
        log.debug("malloc_trim unavailable: %s", exc)


def allocator_summary() -> str:
    """What the benchmark report records about the allocator."""
    if _STATE.get("applied"):
        return "glibc, freed memory kept (mallopt: mmap_max=0, no trim)"
    return f"{platform.libc_ver()[0] or 'system'} default"
