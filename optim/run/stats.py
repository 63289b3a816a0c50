"""RunStats: what a run cost, per stage, measured rather than estimated.

Peak memory is the CUDA allocator's maximum on a GPU and the process resident-set high-water mark
on a CPU (reset at each stage through /proc/self/clear_refs on Linux; elsewhere a sampling thread
watches the RSS), so each stage's peak is its own.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field


@dataclass
class RunStats:
    """Measured facts about one run, shown by every front-end."""

    family: str = ""
    model: str = ""
    device: str = ""
    dtypes: dict = field(default_factory=dict)
    optimizations: list = field(default_factory=list)  # labels of what was applied (after any fallback)
    applied: list = field(default_factory=list)  # the applied configs as {"kind": ..., <fields>}
    mode: str = "txt2img"
    width: int = 0
    height: int = 0
    batch_size: int = 1
    scheduler: str = ""
    steps: int = 0
    steps_run: int = 0
    cfg: float = 0.0
    cfg_steps: int = 0
    unet_calls: int = 0
    unet_batch_sizes: list = field(default_factory=list)
    stage_s: dict = field(default_factory=dict)
    total_s: float = 0.0
    it_per_s: float = 0.0
    peak_mem_mb: float = 0.0
    stage_peak_mem_mb: dict = field(default_factory=dict)
    mem_kind: str = ""
    cache: str = ""
    prepare_s: float = 0.0
    notes: list = field(default_factory=list)
    counters: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_line(self) -> str:
        """One line for a CLI, a node badge or a log."""
        stages = " ".join(f"{k}={v:.2f}s" for k, v in self.stage_s.items())
        opts = ",".join(self.optimizations) or "none"
        return (f"{self.family} {self.mode} {self.width}x{self.height}x{self.batch_size} {self.scheduler} "
                f"{self.steps_run}/{self.steps} steps | {self.total_s:.2f}s ({stages}) | {self.it_per_s:.2f} it/s | "
                f"unet calls {self.unet_calls} | peak {self.peak_mem_mb:.0f} MB ({self.mem_kind}) | "
                f"{self.device} {self.dtypes.get('unet', '')} | cache {self.cache} | opts {opts}")


def _read_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    """Current resident set size, without psutil."""
    kb = _read_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:
        import psutil  # optional

        return psutil.Process().memory_info().rss
    except ImportError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryMonitor:
    """Per-stage peak memory for one device."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.is_cuda else "rss_high_water"
        self._can_reset_hwm = (not self.is_cuda and os.path.exists("/proc/self/clear_refs")
                               and _read_status_kb("VmHWM") is not None)
        self.stage_peaks: dict[str, float] = {}
        self._poll_peak = 0
        self._stop = threading.Event()
        self._thread = None

    def _reset(self) -> None:
        import torch

        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._can_reset_hwm:
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                    fh.write("5")
            except OSError:
                self._can_reset_hwm = False
        self._poll_peak = _rss_bytes()

    def _peak_bytes(self) -> int:
        import torch

        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self._can_reset_hwm:
            kb = _read_status_kb("VmHWM")
            if kb is not None:
                return kb * 1024
        return max(self._poll_peak, _rss_bytes())

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self._poll_peak = max(self._poll_peak, _rss_bytes())

    @contextmanager
    def stage(self, name: str):
        """Measure the peak memory of the enclosed code under `name`."""
        self._reset()
        poller = None
        if not self.is_cuda and not self._can_reset_hwm:
            self._stop.clear()
            poller = threading.Thread(target=self._poll, daemon=True)
            poller.start()
        try:
            yield
        finally:
            if poller is not None:
                self._stop.set()
                poller.join()
            self.stage_peaks[name] = max(self.stage_peaks.get(name, 0.0), self._peak_bytes() / 2**20)

    @property
    def peak_mb(self) -> float:
        return max(self.stage_peaks.values(), default=0.0)


class StageTimer:
    """Wall time per named stage; synchronises the GPU so times are real."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.times: dict[str, float] = {}

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    @contextmanager
    def stage(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
