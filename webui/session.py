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
                 device: str = "auto", queue_size: int = DEFAULT_QUEUE_SIZE, lora_folders=()):
        self.catalog = catalog
        self.lora_folders = [str(folder) for folder in lora_folders]
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

    def prompt_loras(self, spec, request, *, field: str = "prompt"):
        """(spec, request) with the prompt's `<lora:name:strength>` tags taken out and the LoRAs they name (in
        the LoRA folders) added to the spec; an unknown name is a ConfigError naming `field`."""
        from ..optim.lora.prompt import find_lora, split_lora_tags
        from ..optim.spec.lora import LoraRef

        clean, tags = split_lora_tags(request.prompt)
        if not tags:
            return spec, request
        loras = []
        for name, strength in tags:
            path = find_lora(name, self.lora_folders)
            if path is None:
                where = ", ".join(self.lora_folders) or "no LoRA folder is set"
                raise ConfigError(field, f"no LoRA named {name!r} ({where})",
                                  "put the file into the LoRA folder (--loras DIR), or fix the name in the tag")
            loras.append(LoraRef(path=str(path), strength=strength))
        return spec.with_(loras=spec.loras + tuple(loras)), request.with_(prompt=clean)

    def close(self) -> None:
        self.service.close()
