"""What one web UI server holds: its checkpoints, the one selected, the device, and the generation queue.

The API and the gradio Blocks build their specs here, so both run the same model with the same rules.
"""

from __future__ import annotations

import threading

from ..optim.spec.errors import ConfigError
from .catalog import CheckpointEntry, ModelCatalog
from .service import DEFAULT_QUEUE_SIZE, GenerationService


class WebSession:
    def __init__(self, catalog: ModelCatalog, *, checkpoint: str | None = None, family: str = "auto",
                 device: str = "auto", queue_size: int = DEFAULT_QUEUE_SIZE):
        self.catalog = catalog
        self.family = family
        self.device = device
        self.service = GenerationService(queue_size=queue_size)
        self._lock = threading.Lock()
        self._selected: CheckpointEntry | None = catalog.find(checkpoint, field="--checkpoint") if checkpoint \
            else None

    @property
    def selected(self) -> CheckpointEntry:
        """The selected checkpoint (the first one listed until one is chosen)."""
        with self._lock:
            if self._selected is not None:
                return self._selected
        entries = self.catalog.entries()
        if not entries:
            raise ConfigError("sd_model_checkpoint", "no checkpoint found",
                              "put .safetensors/.ckpt files or diffusers folders into the models folder "
                              "(--models), or name one with --checkpoint")
        return entries[0]

    def select(self, name: str, *, field: str = "sd_model_checkpoint") -> CheckpointEntry:
        entry = self.catalog.find(name, field=field)
        with self._lock:
            self._selected = entry
        return entry

    def spec(self, optimizations=(), *, checkpoint: str | None = None, family: str | None = None,
             field: str = "override_settings.sd_model_checkpoint"):
        """(PipelineSpec, entry) for the selected checkpoint, or the one named `checkpoint` (an unknown name is a
        ConfigError naming `field`), with `optimizations`."""
        from ..optim.spec.model_ref import ModelRef
        from ..optim.spec.pipeline import PipelineSpec

        entry = self.catalog.find(checkpoint, field=field) if checkpoint else self.selected
        model = ModelRef(path=entry.path, family=family or self.family)
        return PipelineSpec(model=model, device=self.device, optimizations=tuple(optimizations)), entry

    def close(self) -> None:
        self.service.close()
