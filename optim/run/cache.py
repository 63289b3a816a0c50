"""The prepared-pipeline cache: load each checkpoint once, apply each spec's optimizations once.

One cache entry per checkpoint (never two copies of the same weights). Running the same spec again
is a hit; a different structural toggle removes the previous optimizations (restoring the loaded
state exactly) and applies the new ones, without touching the disk; per-run settings live in the
GenerationRequest and never reach the cache. Entries are evicted least-recently-used when the
count or memory bound is exceeded.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..core.registry import ApplyContext, apply_all, remove_all
from ..lora.merge import set_loras
from ..models.loader import LoadedModel, load_model
from ..spec.pipeline import PipelineSpec
from .capabilities import resolve_device

log = logging.getLogger(__name__)


def _unique_tensor_bytes(modules) -> int:
    seen = set()
    total = 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            key = (t.data_ptr(), t.device) if not t.is_meta else id(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@dataclass
class PreparedPipeline:
    """A loaded pipeline with one spec's optimizations applied."""

    loaded: LoadedModel
    device: object
    spec: PipelineSpec | None = None
    handles: list = field(default_factory=list)
    status: str = ""  # what the last prepare() did: loaded | reconfigured | hit
    strict: bool = False
    notes: list = field(default_factory=list)  # fallbacks taken for options this machine lacks
    loras: object = None  # the LoraState of what is merged into the weights
    lora_key: tuple = ()  # the merged LoRAs' files and strengths (a file saved again is merged again)
    prepare_s: float = 0.0
    last_used: float = 0.0

    @property
    def pipe(self):
        return self.loaded.pipe

    @property
    def family(self):
        return self.loaded.family

    def modules(self) -> list:
        names = ("unet", "vae") + self.family.text_encoders
        return [m for m in (getattr(self.pipe, n, None) for n in names) if m is not None]

    def nbytes(self) -> int:
        """Weights in memory plus originals kept by optimizations for exact removal."""
        return _unique_tensor_bytes(self.modules()) + sum(h.held_bytes() for h in self.handles)

    @property
    def applied(self) -> list:
        """The configs actually applied, in order: fallbacks replace what this machine lacks."""
        return [h.info["config"] for h in self.handles if "config" in h.info]

    def handle(self, kind: str):
        return next((h for h in self.handles if h.name == kind), None)


def _default_memory_budget() -> int:
    """60% of physical RAM: room for one large model plus the host's own working memory."""
    from .capabilities import total_memory_bytes

    return int(total_memory_bytes() * 0.6)


class PipelineCache:
    """Bounded, thread-safe cache of prepared pipelines keyed by checkpoint identity."""

    def __init__(self, max_entries: int = 2, max_bytes: int | None = None):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes if max_bytes is not None else _default_memory_budget()
        self._entries: OrderedDict[tuple, PreparedPipeline] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0
        self.applies = 0

    def __len__(self) -> int:
        return len(self._entries)

    @contextmanager
    def use(self, spec: PipelineSpec, *, strict: bool = False):
        """Hold the cache while using the prepared pipeline for `spec` (one run at a time)."""
        with self._lock:
            yield self._prepare(spec, strict)

    def prepare(self, spec: PipelineSpec, *, strict: bool = False) -> PreparedPipeline:
        """The pipeline for `spec`, loaded/applied as needed. strict=True raises for an option this machine
        lacks instead of running its fallback (benchmarks must not fake a configuration)."""
        with self._lock:
            return self._prepare(spec, strict)

    def _prepare(self, spec: PipelineSpec, strict: bool) -> PreparedPipeline:
        # Hosts such as ComfyUI call us under torch.inference_mode(); weights loaded or cast there would become
        # inference tensors (no version counters, read-only outside inference mode), which breaks in-place
        # weight edits and frozen compiles. Loading and applying always happens in normal mode.
        import torch

        with torch.inference_mode(False):
            return self._prepare_normal_mode(spec, strict)

    def _prepare_normal_mode(self, spec: PipelineSpec, strict: bool) -> PreparedPipeline:
        start = time.perf_counter()
        device = resolve_device(spec.device)
        key = spec.model.identity()
        entry = self._entries.get(key)
        status = "hit"
        if entry is None:
            self._make_room_for(spec)
            loaded = load_model(spec.model)
            self.loads += 1
            entry = PreparedPipeline(loaded=loaded, device=device)
            self._entries[key] = entry
            status = "loaded"
        lora_key = tuple(lora.identity() for lora in spec.loras)
        if entry.spec != spec or entry.strict != strict or entry.lora_key != lora_key:
            if status == "hit":
                status = "reconfigured"
            if entry.handles:
                remove_all(entry.handles)
                entry.handles = []
                entry.spec = None
            if spec.loras or entry.loras is not None:  # merged into the loaded weights, under the optimizations
                entry.lora_key = ()
                entry.loras = set_loras(entry.pipe, spec.loras, entry.loras)  # a bad file changes nothing
                entry.lora_key = lora_key
            ctx = ApplyContext(device=device, family=entry.family, offloaded=spec.optimization("offload") is not None)
            entry.handles = apply_all(entry.pipe, spec.optimizations, ctx, strict=strict)  # undoes on failure
            entry.notes = list(entry.handles[0].info.get("notes", [])) if entry.handles else []
            entry.spec = spec
            entry.strict = strict
            entry.device = device
            self.applies += 1
        entry.status = status
        entry.prepare_s = time.perf_counter() - start
        entry.last_used = time.time()
        self._entries.move_to_end(key)
        self._evict(keep=key)
        if status != "hit":
            log.info("prepared %s (%s) in %.1fs", spec.model.display_name, status, entry.prepare_s)
        return entry

    def _make_room_for(self, spec: PipelineSpec) -> None:
        """Evict before loading, so two large models are never held at once for no reason."""
        while len(self._entries) >= self.max_entries:
            self._drop(next(iter(self._entries)))
        estimate = 0
        if not spec.model.is_synthetic:
            path = Path(spec.model.path).expanduser()
            if path.is_file():
                estimate = path.stat().st_size
        while self._entries and self.memory_bytes() + estimate > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _evict(self, keep) -> None:
        while len(self._entries) > self.max_entries or (self.memory_bytes() > self.max_bytes and
                                                        len(self._entries) > 1):
            victim = next(k for k in self._entries if k != keep)
            self._drop(victim)

    def _drop(self, key) -> None:
        entry = self._entries.pop(key)
        log.info("released %s from the pipeline cache", entry.loaded.source)
        del entry
        _release_memory()

    def memory_bytes(self) -> int:
        return sum(e.nbytes() for e in self._entries.values())

    def entries(self) -> list[PreparedPipeline]:
        return list(self._entries.values())

    def release(self, entry: PreparedPipeline) -> bool:
        """Drop this very entry (found by identity, so a file changed on disk since loading is no obstacle)."""
        with self._lock:
            for key, candidate in list(self._entries.items()):
                if candidate is entry:
                    self._drop(key)
                    return True
            return False

    def evict(self, spec_or_model) -> bool:
        """Drop the entry of a spec or ModelRef; True if there was one."""
        model = getattr(spec_or_model, "model", spec_or_model)
        with self._lock:
            key = model.identity()
            if key in self._entries:
                self._drop(key)
                return True
            return False

    def clear(self) -> None:
        """Drop every prepared pipeline and give the memory back."""
        with self._lock:
            self._entries.clear()
            _release_memory()


def _release_memory() -> None:
    from .allocator import release_free_memory

    gc.collect()
    release_free_memory()  # kept-for-reuse heap memory goes back to the OS with the pipeline
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


_DEFAULT: PipelineCache | None = None
_DEFAULT_LOCK = threading.Lock()


def default_cache() -> PipelineCache:
    """The process-wide cache front-ends share (created on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = PipelineCache()
        return _DEFAULT
