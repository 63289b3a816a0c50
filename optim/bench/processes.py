"""A local server in a child process, for benchmarks and tests: a free loopback port, waiting until it answers,
and stopping it (politely, then for good). Host-free: it only speaks HTTP."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Callable

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float, *, name: str,
                  detail: Callable[[], str] = lambda: "", interval: float = 0.3) -> None:
    """Return once GET `url` answers 200; raise RuntimeError (with `detail()`, e.g. the log's tail) if `process`
    exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}{detail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(interval)
    raise RuntimeError(f"{name} did not answer within {timeout:.0f} s{detail()}")


def stop_process(process: subprocess.Popen, timeout: float, first: int = signal.SIGTERM) -> None:
    """Send `first` (SIGTERM, or SIGINT for a server that shuts down on Ctrl+C), then kill after `timeout` s."""
    if process.poll() is not None:
        return
    process.send_signal(first)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
