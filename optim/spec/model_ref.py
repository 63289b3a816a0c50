"""`ModelRef`: which weights to load, and what the user told us about them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..models.families import FAMILIES, PREDICTION_TYPES
from .fields import Config, option

SYNTHETIC_SCHEMES = ("synthetic", "synthetic-tiny")
FAMILY_CHOICES = ("auto",) + tuple(FAMILIES)


@dataclass(frozen=True)
class ModelRef(Config):
    """A checkpoint file, a diffusers folder, or `synthetic:<family>` (real architecture, random weights)."""

    path: str = option("", "Checkpoint file (.safetensors/.ckpt), diffusers folder, or synthetic:<family> "
                       "for random weights of the real architecture (benchmarks)")
    family: str = option("auto", "Model family. auto detects it from the weights; set it where weights cannot "
                         "tell (SD2 base vs 768-v vs SD-Turbo, SDXL vs SDXL-Turbo)", choices=FAMILY_CHOICES)
    prediction_type: str = option("auto", "What the UNet predicts. auto uses the family default (v_prediction "
                                  "for SD 2.1 768-v)", choices=PREDICTION_TYPES)
    config_dir: str = option("", "Optional diffusers config folder (model_index.json and component configs) to "
                             "use instead of the family's shipped one, for a checkpoint with a non-standard "
                             "architecture. Leave empty for normal checkpoints")

    @classmethod
    def synthetic(cls, family: str, tiny: bool = False) -> "ModelRef":
        """Random weights in the real architecture of `family` (or a tiny version for tests)."""
        return cls(path=f"{'synthetic-tiny' if tiny else 'synthetic'}:{family}", family=family)

    @property
    def is_synthetic(self) -> bool:
        return self.path.split(":", 1)[0] in SYNTHETIC_SCHEMES and ":" in self.path

    def identity(self) -> tuple:
        """A cache key that changes when the file on disk changes (size or modification time)."""
        if self.is_synthetic:
            return ("synthetic", self.path, self.family, self.prediction_type, self.config_dir)
        path = Path(self.path).expanduser()
        try:
            st = path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
            if path.is_dir():
                index = path / "model_index.json"
                stamp = (index.stat().st_mtime_ns,) if index.exists() else stamp
        except OSError:
            stamp = None
        return (os.path.realpath(path), stamp, self.family, self.prediction_type, self.config_dir)

    @property
    def display_name(self) -> str:
        return self.path if self.is_synthetic else Path(self.path).name
