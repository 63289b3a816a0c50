"""The native Winograd kernel built for a host's Python before that host's tests start.

A host's venv has a torch of its own, so its kernel is a build of its own (3-5 minutes on 2 cores). A host
starts that build in the background on its first Winograd run and runs F.conv2d until it is done (tested in
test_native_build.py); the host tests that check the kernel's results need it built, as a user's machine has it
after its first Winograd run. Building it up front, in the host's Python and waiting for it, keeps those tests
from depending on how long the earlier tests took.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# the pack's folder imported as the package `sdaccel` without running its __init__ (as a host would)
BUILD = r"""
import sys, types
pack = types.ModuleType("sdaccel")
pack.__path__ = [sys.argv[1]]
sys.modules["sdaccel"] = pack
from sdaccel.cpukernels import native
if not native.is_built() and native.unavailable_reason() is not None:
    print("cannot build")  # no compiler or ninja in this venv: the host runs the PyTorch Winograd
else:
    ops = native.native_ops(build=True)
    print("ready" if ops is not None else f"unavailable: {native.error()}")
"""

_READY: set[str] = set()


def build_for(python: str) -> None:
    """Build (or find built) the kernel for `python`'s torch; a test failure naming the reason if its build fails.
    A venv that cannot build it (no compiler or ninja: the host lanes' A1111 and Forge venvs, which find the
    kernel the ComfyUI lane built for the same torch) goes on: its host runs the PyTorch Winograd."""
    if python in _READY:
        return
    done = subprocess.run([python, "-c", BUILD, str(ROOT)], capture_output=True, text=True, timeout=1200)
    said = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0 or said not in ("ready", "cannot build"):  # a build that was tried and failed
        pytest.fail(f"the native Winograd kernel did not build for {python}: {said or done.stderr[-2000:]}")
    _READY.add(python)
