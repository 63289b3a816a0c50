"""The native Winograd kernel (csrc/winograd.cpp): built once per machine, loaded as `torch.ops.sdaccel_winograd`.

The kernel fuses the input transform, the products (oneDNN's batch-reduce GEMM micro-kernel, which PyTorch
exports) and the output transform per block of tiles, so the transformed tiles stay in the core's cache, and it
can transform the filters on the fly inside the call instead of keeping them (4x a layer's weight for F(4,3)).
It is compiled for this CPU (`-march=native`) with torch's C++ extension builder; the build (about 2-3 minutes
on 2 cores) is kept under the SDAccel cache folder (or $SDACCEL_NATIVE_DIR), keyed by the source, the torch and
Python versions and the CPU's instruction set, so a changed CPU never loads code built for another. Where no C++ compiler (or ninja)
is found, or the build fails, `native_ops()` answers None with the reason and callers keep the PyTorch
Winograd (cpukernels/winograd.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from .paths import native_build_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "winograd.cpp"
NAMESPACE = "sdaccel_winograd"

_LOCK = threading.Lock()
_STATE: dict = {}  # "ops": the loaded op namespace, or "error": why there is none


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags (what -march=native compiles for)."""
    text = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
        flags = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(("flags", "Features"))), "")
        text = f"{model}|{flags}"
    except OSError:
        pass
    return f"{platform.machine()}|{text}"


def build_key() -> str:
    """What a build depends on: the source, torch, Python and the CPU."""
    raw = b"|".join([SOURCE.read_bytes(), torch.__version__.encode(), sys.version.encode(),
                     _cpu_signature().encode()])
    return hashlib.sha1(raw).hexdigest()[:16]


def build_dir() -> Path:
    return native_build_root() / build_key()


def _compiler() -> str | None:
    names = [os.environ.get("CXX")] + ["c++", "g++", "clang++", "cl"]
    return next((path for path in (shutil.which(n) for n in names if n) if path), None)


def _flags() -> tuple[list[str], list[str]]:
    if os.name == "nt":
        return ["/O2", "/openmp"], []
    cflags = ["-O3", "-march=native" if platform.machine().lower() in ("x86_64", "amd64") else "-mcpu=native"]
    if sys.platform != "darwin":  # Apple's clang has no OpenMP; torch's thread pool then runs the blocks
        cflags.append("-fopenmp")
        return cflags, ["-fopenmp"]
    return cflags, []


def unavailable_reason() -> str | None:
    """Why the native kernel cannot be built here, without trying (None: it can be tried)."""
    if not SOURCE.is_file():
        return f"its source {SOURCE} is missing from this installation"
    if _compiler() is None:
        return "no C++ compiler found (install g++ or clang; MSVC on Windows)"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except (RuntimeError, ImportError):
        return "ninja is not installed (pip install ninja)"
    return None


def _library(folder: Path) -> Path | None:
    found = sorted(folder.glob(f"{NAMESPACE}_*.so")) + sorted(folder.glob(f"{NAMESPACE}_*.pyd"))
    return found[0] if found else None


def is_built() -> bool:
    """Whether this machine already has the kernel built (loading it then takes no compile)."""
    return _library(build_dir()) is not None


def native_ops(build: bool = True):
    """The loaded kernel's op namespace (`conv2d`, `transform_filters`, ...), or None where it is unavailable.

    The first call in a process builds the kernel if this machine has not (`build=False` only loads an existing
    build). Thread-safe; a failure is remembered for the process and logged once.
    """
    if "ops" in _STATE or "error" in _STATE:
        return _STATE.get("ops")
    with _LOCK:
        if "ops" in _STATE or "error" in _STATE:
            return _STATE.get("ops")
        if not build and not is_built():
            return None
        reason = unavailable_reason()
        if reason is None:
            try:
                _load()
                return _STATE["ops"]
            except Exception as exc:  # noqa: BLE001 - any build or load failure means "use the PyTorch Winograd"
                reason = f"building it failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]})"
        _STATE["error"] = reason
        log.warning("Winograd: native kernel unavailable (%s); using the PyTorch Winograd", reason)
        return None


def error() -> str | None:
    """Why `native_ops()` answered None in this process (None if it loaded or was not asked yet)."""
    return _STATE.get("error")


STALE_BUILD_S = 3 * 3600  # a private build folder this old belongs to a process that died while building


def _load() -> None:
    """Load the finished build, or build into a private folder and move it into place.

    A finished build is loaded directly, never through torch's builder: that one waits on a lock file as long
    as it exists, and a host killed during its first build (a Ctrl+C in ComfyUI) would leave one behind that
    makes every later start hang. So each build happens in a folder of its own (its lock dies with it) and is
    renamed into place when complete; a process that finds the build finished by another uses that one."""
    from torch.utils.cpp_extension import load

    folder = build_dir()
    library = _library(folder)
    if library is None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(folder.parent)
        private = folder.parent / f".{folder.name}.build-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(private, ignore_errors=True)
        private.mkdir()
        cflags, ldflags = _flags()
        start = time.perf_counter()
        log.info("Winograd: building the native kernel for this CPU (once; about 2-3 minutes) in %s", folder)
        try:
            load(name=f"{NAMESPACE}_{build_key()}", sources=[str(SOURCE)], extra_cflags=cflags,
                 extra_ldflags=ldflags, build_directory=str(private), is_python_module=False, verbose=False)
        except BaseException:
            shutil.rmtree(private, ignore_errors=True)
            raise
        if folder.exists() and _library(folder) is None:  # an unfinished folder (an older layout): not a build
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(private, folder)  # complete or absent, even with another process building beside us
        except OSError:  # another process finished first: its build is as good as ours
            shutil.rmtree(private, ignore_errors=True)
        log.info("Winograd: native kernel built in %.0f s", time.perf_counter() - start)
    else:
        torch.ops.load_library(str(library))
    ops = getattr(torch.ops, NAMESPACE)
    _STATE["ops"] = ops
    _STATE["bf16"] = bool(ops.bf16_native())


def _remove_stale_builds(root: Path) -> None:
    now = time.time()
    for leftover in root.glob(".*.build-*"):
        try:
            if now - leftover.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


def bf16_products() -> bool:
    """Whether the loaded kernel's bf16 products run on this CPU's native instructions (AVX-512 / AMX)."""
    return bool(_STATE.get("bf16"))


def scratch_bytes() -> int:
    ops = _STATE.get("ops")
    return int(ops.scratch_bytes()) if ops is not None else 0


def release_scratch() -> None:
    """Give back the scratch memory the kernel keeps between calls (when no convolution runs)."""
    ops = _STATE.get("ops")
    if ops is not None:
        ops.release_scratch()
