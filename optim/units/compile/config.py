"""Compile settings (backend, mode, targets, granularity): plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...spec.errors import ConfigError
from ...spec.fields import option
from ...spec.optimization import OptimizationConfig, Stage, register_config

BACKENDS = ("inductor", "openvino", "stable_fast", "onediff", "tensorrt")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TARGETS = ("unet", "unet+vae", "unet+vae+text_encoder")
GRANULARITIES = ("auto", "whole", "blocks")
DYNAMO_BACKENDS = ("inductor", "tensorrt")  # torch.compile-based: can compile layer by layer
OPENVINO_INT8 = ("off", "weights", "full")
OPENVINO_STATIC_KEEP = 2  # compiled shapes kept per target with dynamic off: CFG batch and post-cutoff batch


@register_config
@dataclass(frozen=True)
class CompileConfig(OptimizationConfig):
    """Which compiler, for which modules, and how it treats sizes and weights."""

    kind: ClassVar[str] = "compile"
    stage: ClassVar[Stage] = Stage.COMPILE
    title: ClassVar[str] = "Compile"
    lossless: ClassVar[bool] = True
    backend: str = option("inductor", "Compiler. inductor: torch.compile, CPU and GPU (needs a C++ compiler on a CPU, "
                          "Triton on a GPU). openvino: CPU only (pip install openvino), ~1.2-1.6x per UNet step on a "
                          "small CPU. stable_fast / onediff / tensorrt: NVIDIA GPUs only. Every backend pauses the "
                          "first run to compile (about 1-2 minutes for a full UNet)", choices=BACKENDS)
    mode: str = option("default", "torch.compile mode (inductor only). reduce-overhead and max-autotune add CUDA "
                       "graphs (no effect on a CPU); max-autotune benchmarks kernels and compiles for much longer",
                       choices=MODES)
    dynamic: bool = option(False, "Compile once for every image size and batch (on) or once per size (off). Off "
                           "gives the fastest code but pauses again for each new size or batch; inductor gives up "
                           f"after 8 sizes and runs eager, openvino keeps the last {OPENVINO_STATIC_KEEP}")
    freezing: bool = option(False, "inductor only: bake the weights into the graph as constants. The one setting "
                            "that speeds up inductor on a CPU (~1.2-1.35x), at the cost of a second copy of the "
                            "prepacked weights; a weight change (LoRA) then forces a recompile")
    targets: str = option("unet", "What to compile: the UNet, or the UNet and the VAE decoder (another compile "
                          "pause; helps large decodes), or those and the text encoder (SD 1.x/2.x and Taiyi "
                          "prompts; SDXL's encoders, asked for their hidden states, stay eager)", choices=TARGETS)
    granularity: str = option("auto", "whole: one graph for the whole UNet (fastest code). blocks: one graph per "
                              "resnet / attention / resampler layer, the glue between them left in Python; needed "
                              "when another optimization (DeepCache) decides per step which layers run, since a "
                              "whole-UNet graph would recompile every step. auto: blocks when another optimization "
                              "has replaced the UNet's forward, whole otherwise. blocks needs backend inductor or "
                              "tensorrt", choices=GRANULARITIES)
    openvino_precision: str = option("f32", "openvino only. f32: exact fp32 math. auto: OpenVINO may compute in "
                                     "bf16 on CPUs with AVX512-BF16/AMX: faster, lossy (~1e-1 difference on "
                                     "random weights)", choices=("f32", "auto"))
    on_weight_change: str = option("recompile", "When weights change in place after compiling (e.g. a LoRA "
                                   "applied to the loaded model) and the backend baked them in: recompile before "
                                   "the next call (another compile pause), or stop with an error", choices=(
                                       "recompile", "error"))
    openvino_int8: str = option("off", "openvino only, lossy (pip install nncf). weights: weights stored in int8 "
                                "(about 4x less memory for them), computed in float. full: weights and activations "
                                "in int8 (fastest on CPUs with VNNI or AMX), calibrated on this pipeline's own "
                                "inputs: the first run after applying runs uncompiled while it records them, and "
                                "the int8 model is built when it ends", choices=OPENVINO_INT8, late=True)

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        if self.mode != "default" and self.backend != "inductor":
            raise ConfigError(f"{owner}.mode", f"{self.mode} applies to backend inductor only, not {self.backend}",
                              "set mode to default")
        if self.freezing and self.backend != "inductor":
            raise ConfigError(f"{owner}.freezing", f"freezing applies to backend inductor only ({self.backend} "
                              "always bakes the weights in)", "turn freezing off")
        if self.granularity == "blocks" and self.backend not in DYNAMO_BACKENDS:
            raise ConfigError(f"{owner}.granularity", f"blocks needs a torch.compile backend "
                              f"({', '.join(DYNAMO_BACKENDS)}); {self.backend} converts the whole UNet",
                              "use granularity auto or whole")
        if self.openvino_precision != "f32" and self.backend != "openvino":
            raise ConfigError(f"{owner}.openvino_precision", f"applies to backend openvino only, not "
                              f"{self.backend}", "leave it at f32")
        if self.openvino_int8 != "off" and self.backend != "openvino":
            raise ConfigError(f"{owner}.openvino_int8", f"int8 quantization (NNCF) applies to backend openvino only, "
                              f"not {self.backend}", "set it to off, or use backend openvino")

    @property
    def bakes_weights(self) -> bool:
        """Whether compiled graphs may hold their own copy of the weights (so in-place changes could go unseen)."""
        return self.backend != "inductor" or self.freezing

    def conflict_with(self, other) -> str | None:
        """DeepCache needs layer-by-layer graphs (the offload conflict is declared by offload)."""
        if other.kind == "deepcache" and _granularity(self, forward_replaced=True) == "whole":
            return (f"DeepCache decides in Python at every step which UNet layers run; {self.backend} with "
                    f"granularity {self.granularity} would compile the whole UNet and freeze (openvino, "
                    "stable_fast, onediff) or recompile (inductor, whole) that decision. Use backend inductor "
                    "with granularity auto or blocks")
        return super().conflict_with(other)


def _granularity(cfg: CompileConfig, *, forward_replaced: bool) -> str:
    """The granularity `auto` resolves to: blocks (torch.compile backends only) over a replaced forward."""
    if cfg.granularity != "auto":
        return cfg.granularity
    return "blocks" if forward_replaced and cfg.backend in DYNAMO_BACKENDS else "whole"
