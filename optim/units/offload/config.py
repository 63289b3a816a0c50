"""Offload settings: plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...spec.fields import option
from ...spec.optimization import OptimizationConfig, Stage, register_config

MODES = ("model", "sequential", "group", "staged", "lowvram")


@register_config
@dataclass(frozen=True)
class OffloadConfig(OptimizationConfig):
    """How weights are moved out of the way between uses."""

    kind: ClassVar[str] = "offload"
    stage: ClassVar[Stage] = Stage.OFFLOAD
    title: ClassVar[str] = "Offload"
    lossless: ClassVar[bool] = True
    conflicts: ClassVar[dict[str, str]] = {
        "compile": "compiled graphs expect the weights to stay where they were traced (frozen graphs keep their own "
                   "copy), while offloading moves them on every run; use either compile (speed) or offload (memory)"}
    mode: str = option("staged", "model: components visit the GPU in turn (memory ~halved, small time cost). "
                       "sequential: each sub-module per call (lowest memory, very slow). group: blocks of layers "
                       "with overlapped copies (a middle ground; spills to disk on a CPU). staged (--medvram): text "
                       "encoders, UNet and VAE take turns; on a CPU idle parts wait on disk. lowvram: UNet blocks "
                       "one at a time", choices=MODES)
    group_type: str = option("block_level", "group mode: block_level moves groups of blocks, leaf_level single "
                             "layers (less memory, more copies)", choices=("block_level", "leaf_level"))
    blocks_per_group: int = option(1, "group mode, block_level: blocks moved together", min=1, max=64, step=1)
    use_streams: bool = option(True, "group mode on CUDA: overlap weight copies with compute on a second stream")
    spill_dir: str = option("", "CPU staging/group: folder for the spilled weights (empty = the system temp "
                            "folder). Needs free disk about the size of the model")
