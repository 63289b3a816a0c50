"""Builds the native Winograd kernel into its folder, once per machine: run as a script in a process of its own.

`native.py` starts `python native_build.py '<spec json>'` in the background (niced, so sampling keeps the cores'
priority). The build holds an exclusive lock on `<folder>.lock` (an OS file lock: it dies with its process, so a
killed build never blocks the next one), compiles into a private folder and renames it into place only once
complete: a reader sees either no build or a finished one. A second process that asks for the same build waits on
the lock and then finds it done. Imports only the standard library here (torch once compiling), so it runs as a
script and imports as a module alike.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

PREFIX = "sdaccel_winograd"


def library_in(folder: Path) -> Path | None:
    """The built library in `folder`, or None."""
    found = sorted(folder.glob(f"{PREFIX}_*.so")) + sorted(folder.glob(f"{PREFIX}_*.pyd"))
    return found[0] if found else None


@contextmanager
def exclusive_lock(path: Path):
    """Hold an exclusive OS lock on `path` for the block (waits while another process holds it)."""
    with open(path, "a+b") as fh:
        if os.name == "nt":
            import msvcrt

            while True:
                try:
                    fh.seek(0)
                    msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)  # retries for 10 s, then raises
                    break
                except OSError:
                    continue
            try:
                yield
            finally:
                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def compile_into(spec: dict, private: Path) -> None:
    """torch's C++ extension builder on the kernel's source, into `private`."""
    from torch.utils.cpp_extension import load

    load(name=spec["name"], sources=[spec["source"]], extra_cflags=spec["cflags"], extra_ldflags=spec["ldflags"],
         build_directory=str(private), is_python_module=False, verbose=False)


def install(spec: dict, compile_fn: Callable[[dict, Path], None] = compile_into) -> bool:
    """Build `spec` into spec["folder"] unless it is there; True if this call built it."""
    folder = Path(spec["folder"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder.parent / f"{folder.name}.lock"):
        if library_in(folder) is not None:
            return False  # another process built it while this one waited
        for leftover in folder.parent.glob(f".{folder.name}.build-*"):  # under the lock, nobody else builds these
            shutil.rmtree(leftover, ignore_errors=True)
        private = folder.parent / f".{folder.name}.build-{os.getpid()}"
        private.mkdir()
        try:
            compile_fn(spec, private)
            if library_in(private) is None:
                raise RuntimeError(f"the build left no library in {private}")
        except BaseException:
            shutil.rmtree(private, ignore_errors=True)
            raise
        if folder.exists():  # an unfinished folder of an older layout: not a build
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(private, folder)  # complete or absent for every reader
        return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: native_build.py '<build spec as JSON>'", file=sys.stderr)
        return 2
    if hasattr(os, "nice"):
        os.nice(10)  # the compiler yields the cores to sampling
    start = time.perf_counter()
    built = install(json.loads(argv[0]))
    print(f"{'built' if built else 'already built'} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
