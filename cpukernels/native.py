"""The native Winograd kernel (csrc/winograd.cpp): built once per machine, loaded as `torch.ops.sdaccel_winograd`.

The kernel fuses the input transform, the products (oneDNN's batch-reduce GEMM micro-kernel, which PyTorch
exports) and the output transform per block of tiles, so the transformed tiles stay in the core's cache, and it
can transform the filters on the fly inside the call instead of keeping them (4x a layer's weight for F(4,3)).
It is compiled for this CPU (`-march=native`) with torch's C++ extension builder, in a background process
(native_build.py: niced, one build per machine under a lock file, installed atomically) that a sampling run
starts and never waits for: until it is ready the Winograd unit runs F.conv2d and says so, and the next run loads
it. The build (about 2-3 minutes on 2 cores) is kept under the SDAccel cache folder (or $SDACCEL_NATIVE_DIR),
keyed by the source, the torch and Python versions and the CPU's instruction set, so a changed CPU never loads
code built for another. Where no C++ compiler (or ninja) is found, or the build fails, the kernel is unavailable
with the reason (`error()`) and callers keep the PyTorch Winograd (cpukernels/winograd.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from .native_build import PREFIX, library_in
from .paths import native_build_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "winograd.cpp"
BUILD_SCRIPT = Path(__file__).with_name("native_build.py")
NAMESPACE = PREFIX

_LOCK = threading.Lock()
_STATE: dict = {}  # "ops": the loaded op namespace, or "error": why there is none
_BUILD: dict = {}  # "thread": this process's background build, "seconds": how long it took


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
    return library_in(folder)


def is_built() -> bool:
    """Whether this machine already has the kernel built (loading it then takes no compile)."""
    return _library(build_dir()) is not None


def native_ops(build: bool = True):
    """The loaded kernel's op namespace (`conv2d`, `transform_filters`, ...), or None where it is unavailable.

    `build=True` builds the kernel if this machine has not and waits for it (minutes: for tools and tests); a
    sampling run calls `kernel_state()` instead, which never waits. `build=False` only loads an existing build.
    Thread-safe; a failure is remembered for the process and logged once.
    """
    if "ops" in _STATE or "error" in _STATE:
        return _STATE.get("ops")
    if build and not is_built():
        reason = unavailable_reason()
        if reason is not None:
            _fail(reason)
            return None
        build_in_background()
        thread = _BUILD.get("thread")
        if thread is not None:
            thread.join()
    with _LOCK:
        if "ops" in _STATE or "error" in _STATE:
            return _STATE.get("ops")
        library = _library(build_dir())
        if library is None:
            return None
        try:
            torch.ops.load_library(str(library))
            ops = getattr(torch.ops, NAMESPACE)
            _STATE["bf16"] = bool(ops.bf16_native())
        except Exception as exc:  # noqa: BLE001 - a library that does not load means "use the PyTorch Winograd"
            _fail(f"loading {library} failed ({type(exc).__name__}: {str(exc).strip()[:300]})")
            return None
        _STATE["ops"] = ops
        return ops


def kernel_state() -> str:
    """"ready" (loaded), "building" (in the background; asking starts the build once per machine) or
    "unavailable" (see `error()`). Never waits for a build: a sampling run asks this and goes on meanwhile."""
    if native_ops(build=False) is not None:
        return "ready"
    if error() is not None:
        return "unavailable"
    reason = unavailable_reason()
    if reason is not None:
        _fail(reason)
        return "unavailable"
    if build_in_background():
        return "building"
    if native_ops(build=False) is not None:  # the build finished between the two questions
        return "ready"
    _fail(error() or "its build ended without a library")
    return "unavailable"


def _fail(reason: str) -> None:
    if "error" not in _STATE:
        _STATE["error"] = reason
        log.warning("Winograd: native kernel unavailable (%s); using the PyTorch Winograd", reason)


def error() -> str | None:
    """Why the kernel is unavailable in this process (None if it loaded, is building or was not asked yet)."""
    return _STATE.get("error")


STALE_BUILD_S = 3 * 3600  # a private build folder this old belongs to a process that died while building


def _build_spec() -> dict:
    cflags, ldflags = _flags()
    return {"name": f"{NAMESPACE}_{build_key()}", "source": str(SOURCE), "cflags": cflags, "ldflags": ldflags,
            "folder": str(build_dir())}


def _build_command(spec: dict) -> list[str]:
    """The process that builds the kernel (native_build.py run as a script: its lock makes one build per machine,
    however many processes ask)."""
    return [sys.executable, str(BUILD_SCRIPT), json.dumps(spec)]


def build_in_background() -> bool:
    """Start building the kernel in a process of its own, once per process (the build's lock file makes it once
    per machine); True while that build runs. The finished build is installed atomically, and the next
    `kernel_state()` loads it."""
    with _LOCK:
        thread = _BUILD.get("thread")
        if thread is None and not is_built():
            thread = threading.Thread(target=_build_worker, name="sdaccel-native-build", daemon=True)
            _BUILD["thread"] = thread
            thread.start()
        return thread is not None and thread.is_alive()


def building() -> bool:
    """Whether this process's background build is running."""
    thread = _BUILD.get("thread")
    return thread is not None and thread.is_alive()


def build_seconds() -> float | None:
    """How long this process's background build took (None: none ran, or it is still running)."""
    return _BUILD.get("seconds")


def _build_worker() -> None:
    spec = _build_spec()
    root = Path(spec["folder"]).parent
    start = time.perf_counter()
    log.info("Winograd: building the native kernel for this CPU in the background (once; about 2-3 minutes) "
             "in %s; until it is ready Winograd layers run F.conv2d", spec["folder"])
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(root)
        log_path = root / f"{Path(spec['folder']).name}.build.log"
        with open(log_path, "w", encoding="utf-8") as out:
            done = subprocess.run(_build_command(spec), stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0 or not is_built():
            lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            last = lines[-1].strip()[:300] if lines else f"exit status {done.returncode}"
            _fail(f"building it failed ({last}; full log in {log_path})")
            return
    except Exception as exc:  # noqa: BLE001 - whatever stops the build means "use the PyTorch Winograd"
        _fail(f"building it failed ({type(exc).__name__}: {exc})")
        return
    _BUILD["seconds"] = time.perf_counter() - start
    log.info("Winograd: native kernel built in %.0f s; the next run uses it", _BUILD["seconds"])


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
