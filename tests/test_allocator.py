"""glibc keeps freed memory once told to: re-allocating a large block no longer faults in fresh pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys, torch
if sys.argv[1] == "keep":
    from sdaccel.optim.run.allocator import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
def cycle():
    t = torch.empty(64 * 2**20 // 4)
    t.fill_(1.0)
    del t
cycle()
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    def faults(mode: str) -> int:  # a fresh process each: the setting is process-wide
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    cycle_pages = 64 * 2**20 // 4096
    default, keep = faults("default"), faults("keep")
    assert default > 15 * cycle_pages  # glibc's default maps and unmaps the 64 MiB block on every one of 20 cycles
    # Kept: fresh pages stop after a few cycles. Not zero: a small allocation may land in a freed block,
    # so the heap settles on two or three 64 MiB blocks used in turn (each faulted in once).
    assert keep <= 3 * cycle_pages, (default, keep)


def test_bench_reports_the_allocator():
    from sdaccel.optim.run.capabilities import machine_summary

    assert "allocator" in machine_summary()


TRIM_PROBE = r"""
import os, torch
from sdaccel.optim.run.allocator import keep_freed_memory, release_free_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
keep_freed_memory()
start = rss()
t = torch.ones(256 * 2**20 // 4)
del t
kept = rss() - start
release_free_memory()
print(kept, rss() - start)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_released_memory_goes_back_to_the_os():
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True)
    kept, after = (int(v) for v in out.stdout.strip().splitlines()[-1].split())
    assert kept > 200 * 2**20  # kept for reuse while the pipeline lives
    assert after < 50 * 2**20  # returned when the cache drops a pipeline (or bench starts a row)


DEFAULT_TRIM_PROBE = r"""
import ctypes, os, torch
from sdaccel.optim.run import allocator
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
# A host's thresholds as its history leaves them: glibc raises the mmap threshold (to <= 32 MB) and the trim
# threshold (twice that) with its first large frees. Set here, not provoked, so the heap's layout is the same
# every run (provoked, a tensor's alignment remainder sometimes let the top of the heap be trimmed at free).
libc = ctypes.CDLL("libc.so.6")
assert libc.mallopt(-3, 32 * 2**20) and libc.mallopt(-1, 2**30)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
start = rss()
weights, kept_alive = [], []
for _ in range(32):  # 256 MB of 8 MB tensors, from the heap, each followed by a small tensor that stays:
    weights.append(torch.ones(8 * 2**20 // 4))  # freed, they are holes below the heap's top, which glibc
    kept_alive.append(torch.ones(4096))  # only gives back when trimmed
del weights
kept = rss() - start
allocator.release_free_memory()
assert "applied" not in allocator._STATE  # keep_freed_memory was never called: glibc's own policy
print(kept, rss() - start)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_weights_go_back_to_the_os_with_glibcs_defaults_too():
    """A host process (A1111, Forge, ComfyUI) keeps glibc's defaults: a dropped model's pages come back only
    when trimmed."""
    out = subprocess.run([sys.executable, "-c", DEFAULT_TRIM_PROBE], capture_output=True, text=True, check=True)
    kept, after = (int(v) for v in out.stdout.strip().splitlines()[-1].split())
    assert kept > 200 * 2**20, kept  # freed, but still resident
    assert after < 50 * 2**20, after
