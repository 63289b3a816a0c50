"""Precision: the dtype of each component, and the device the weights live on.

fp16 halves weight memory and is the GPU baseline; bf16 keeps fp32's range (no fp16 overflow) where
the hardware has it. On a CPU without native fp16/bf16 both are emulated and far slower (~40x for
bf16 on an AVX2 CPU), so they are refused there unless `allow_emulated` is set. Where a CPU has
native bf16 (AVX512-BF16, AMX) it is the largest single CPU speedup: an SD1.5 UNet step at 256x256
ran 2.7x faster in bf16 than in fp32 on a 2-core AMD EPYC. `half` picks the native half precision.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ...core.registry import ApplyContext, Unit, register
from ...run.capabilities import cpu_has_native
from ...spec.errors import UnavailableError
from .config import PrecisionConfig

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_NAMES = {"fp16": "float16", "bf16": "bfloat16"}


def resolve_dtypes(cfg: PrecisionConfig, ctx: ApplyContext) -> dict[str, torch.dtype]:
    """The concrete dtype of each component group ('unet', 'text_encoder', 'vae') for this device."""
    kind = torch.device(ctx.device).type
    gpu = kind in ("cuda", "mps")
    auto = {"unet": "fp16" if gpu else "fp32", "text_encoder": "fp16" if gpu else "fp32",
            "vae": "fp32" if (not gpu or ctx.family.is_xl or kind == "mps") else "fp16"}
    half = "fp16" if gpu else ("bf16" if kind == "cpu" and cpu_has_native("bfloat16") else "fp32")
    out = {}
    for group in ("unet", "text_encoder", "vae"):
        choice = getattr(cfg, group)
        out[group] = TORCH_DTYPES[{"auto": auto[group], "half": half}.get(choice, choice)]
    return out


@contextmanager
def _tf32_scope(matmul: bool, cudnn: bool):
    """Set the TF32 switches for one run and restore them afterwards (never leak process-wide flags)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@register
class Precision(Unit):
    config_cls = PrecisionConfig

    def examples(self) -> list[PrecisionConfig]:
        return [PrecisionConfig(unet="bf16", text_encoder="fp16", vae="bf16", allow_emulated=True),
                PrecisionConfig(unet="fp16", text_encoder="fp32", vae="fp16", allow_emulated=True)]

    def fallback(self, cfg: PrecisionConfig, ctx: ApplyContext) -> PrecisionConfig:
        """Unavailable choices become auto (fp32 on a CPU, fp16 on a GPU)."""
        changes = {}
        for group in ("unet", "text_encoder", "vae"):
            try:
                self.check(PrecisionConfig(**{group: getattr(cfg, group)}, allow_emulated=cfg.allow_emulated), ctx)
            except UnavailableError:
                changes[group] = "auto"
        try:
            self.check(PrecisionConfig(tf32=cfg.tf32), ctx)
        except UnavailableError:
            changes["tf32"] = "auto"
        return cfg.with_(**changes)

    def run_scope(self, cfg: PrecisionConfig, handle, run):
        if cfg.tf32 == "auto" or torch.device(run.device).type != "cuda":
            return None
        matmul = cfg.tf32 in ("on", "matmul_only")
        cudnn = cfg.tf32 in ("on", "cudnn_only")
        return _tf32_scope(matmul, cudnn)

    def check(self, cfg: PrecisionConfig, ctx: ApplyContext) -> None:
        kind = torch.device(ctx.device).type
        if cfg.tf32 != "auto" and kind != "cuda":
            raise UnavailableError(f"precision.tf32={cfg.tf32}", "TF32 exists only on NVIDIA GPUs (Ampere or newer)",
                                   "leave tf32 on auto")
        for group in ("unet", "text_encoder", "vae"):
            choice = getattr(cfg, group)
            if choice in ("fp16", "bf16") and kind == "cpu" and not cfg.allow_emulated \
                    and not cpu_has_native(_NAMES[choice]):
                raise UnavailableError(f"precision.{group}={choice}",
                                       f"this CPU has no native {choice} arithmetic (it would run ~10-40x slower "
                                       "than fp32)", "use fp32 (auto) on this CPU, or set allow_emulated for a "
                                       "test")
            if choice == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
                raise UnavailableError(f"precision.{group}=bf16", "this GPU has no bf16 support", "use fp16")

    def _apply(self, pipe, cfg: PrecisionConfig, ctx: ApplyContext, patch) -> None:
        dtypes = resolve_dtypes(cfg, ctx)
        device = None if ctx.offloaded else torch.device(ctx.device)
        components = {"unet": ["unet"], "vae": ["vae"], "text_encoder": ["text_encoder", "text_encoder_2"]}
        for group, names in components.items():
            for name in names:
                module = getattr(pipe, name, None)
                if module is not None:
                    patch.convert_tensors(module, dtype=dtypes[group], device=device)
        patch.info["dtypes"] = {g: str(d).replace("torch.", "") for g, d in dtypes.items()}
