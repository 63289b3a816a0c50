"""The checkpoints a web UI offers: files and diffusers folders under the user's model folders.

Listed afresh on every call (a file copied in while the server runs shows up, one deleted goes away); never
loaded here. A checkpoint is named the way A1111 names it: its path relative to the folder it was found in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..optim.models.checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from ..optim.spec.errors import ConfigError

_SUFFIXES = SAFETENSORS_SUFFIXES | {".ckpt"}  # .pt/.bin/.pth in model folders are mostly not checkpoints


@dataclass(frozen=True)
class CheckpointEntry:
    title: str  # "sub/name.safetensors": what pickers show and `sd_model_checkpoint` holds
    path: str

    @property
    def model_name(self) -> str:
        """A1111's `model_name`: the title without its suffix, folders joined by underscores."""
        stem = self.title.rsplit(".", 1)[0] if Path(self.title).suffix in _SUFFIXES | PICKLE_SUFFIXES else self.title
        return stem.replace("/", "_").replace("\\", "_")


class ModelCatalog:
    """Checkpoints under `folders` (searched recursively), plus `extra` paths named on the command line."""

    def __init__(self, folders=(), extra=()):
        self.folders = [Path(f).expanduser() for f in folders]
        self.extra = [str(e) for e in extra]

    def entries(self) -> list[CheckpointEntry]:
        found: dict[str, CheckpointEntry] = {}
        for root in self.folders:
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root).as_posix()
                if any(part.endswith(".config") or part.startswith(".") for part in Path(rel).parts[:-1]):
                    continue  # a checkpoint's sidecar config folder, or a hidden one
                if path.is_file() and path.suffix.lower() in _SUFFIXES:
                    found.setdefault(rel, CheckpointEntry(rel, str(path)))
                elif path.is_dir() and not path.name.endswith(".config") and (path / "model_index.json").is_file():
                    found.setdefault(rel, CheckpointEntry(rel, str(path)))
        for item in self.extra:
            found.setdefault(self.extra_title(item), CheckpointEntry(self.extra_title(item), item))
        return sorted(found.values(), key=lambda e: e.title.lower())

    @staticmethod
    def extra_title(item: str) -> str:
        """How a checkpoint named on the command line is listed: its file name, or `synthetic:<family>` as is."""
        return item if ":" in item and not Path(item).exists() else Path(item).name

    def find(self, name: str, *, field: str = "sd_model_checkpoint") -> CheckpointEntry:
        """The entry named `name` (its title, model name or file name; A1111's "[hash]" suffix is ignored), or a
        checkpoint file or diffusers folder at the path `name` (the pickers take a typed path too)."""
        wanted = str(name).split(" [", 1)[0].strip()
        entries = self.entries()
        for entry in entries:
            if wanted in (entry.title, entry.model_name, Path(entry.title).name, Path(entry.title).stem):
                return entry
        path = Path(wanted).expanduser()
        if path.is_absolute() and (path.is_file() and path.suffix.lower() in _SUFFIXES
                                   or path.is_dir() and (path / "model_index.json").is_file()):
            return CheckpointEntry(str(path), str(path))
        known = ", ".join(e.title for e in entries[:12]) or "none (put checkpoints into the models folder)"
        raise ConfigError(field, f"no checkpoint named {name!r}",
                          f"known: {known}; or type the full path of a checkpoint file or diffusers folder")
