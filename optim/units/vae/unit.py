"""VAE variants: the fp16-fix VAE, the Tiny VAE (TAESD / TAESDXL), and sliced / tiled decoding.

The stock SDXL VAE overflows in fp16 (black or noisy images), so it usually runs in fp32; the fp16-fix
VAE (madebyollin/sdxl-vae-fp16-fix) is the same architecture fine-tuned to stay finite in fp16. The Tiny
VAE (~1M parameters per side instead of ~50M) decodes the same latents at a fraction of the memory and
time, with slightly different colours and detail. Slicing decodes a batch one image at a time (same
images, less peak memory); tiling decodes overlapping tiles (near-identical, seams possible) so very
large images fit on small GPUs.

Replacement weights are read the way users hold them: a diffusers folder, an original single file (LDM
keys, optionally under `first_stage_model.`), or the original TAESD `*_decoder` / `*_encoder` files.
Swapping `pipe.vae` is recorded on the unit's PatchSet, so `remove()` puts back the very same module
and pipeline config. `path="synthetic"` builds random weights of the right architecture, so benchmarks
can measure the cost without a file (the images are noise, and logs and RunStats say so).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ...core.registry import ApplyContext, Unit, register
from ...models.sources import source as weight_source
from ...spec.errors import CheckpointError, ConfigError
from .config import SYNTHETIC, VaeConfig
from .files import (  # noqa: F401
    _FULL_HINT,
    _TINY_HINT,
    _build_tiny,
    _tiny_weights,
    load_full_vae,
    taesd_to_diffusers,
)

log = logging.getLogger(__name__)


@dataclass
class _LatentDist:
    """A Gaussian over latents already in the UNet's space (what the sampler reads: mean and std)."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator=None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class TinyDecoderVAE(torch.nn.Module):
    """`pipe.vae` for a decoder-only TAESD file: the Tiny VAE decodes, the original VAE encodes img2img inputs.

    Like AutoencoderTiny, it works on latents already in the UNet's space (scaling factor 1.0): the
    original VAE's posterior is scaled into that space, so img2img encodes exactly as it did before.
    """

    def __init__(self, tiny, original):
        super().__init__()
        self.tiny = tiny
        self.original = original

    @property
    def config(self):
        return self.tiny.config

    @property
    def dtype(self) -> torch.dtype:
        return self.tiny.dtype

    @property
    def device(self) -> torch.device:
        return self.tiny.device

    @property
    def decoder(self) -> torch.nn.Module:
        """The Tiny VAE's decoder network, where AutoencoderTiny keeps it (compilers wrap `vae.decoder`)."""
        return self.tiny.decoder

    @property
    def use_slicing(self) -> bool:
        return self.tiny.use_slicing

    @property
    def use_tiling(self) -> bool:
        return self.tiny.use_tiling

    def _onload(self) -> None:
        """Run an accelerate offload hook installed on this wrapper, as diffusers' VAEs do in encode/decode."""
        hook = getattr(self, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        self._onload()
        dist = self.original.encode(x).latent_dist
        scale = float(self.original.config.scaling_factor)
        shift = float(getattr(self.original.config, "shift_factor", None) or 0.0)
        scaled = _LatentDist((dist.mean - shift) * scale, dist.std * scale)
        return AutoencoderKLOutput(latent_dist=scaled) if return_dict else (scaled,)

    def decode(self, z: torch.Tensor, generator=None, return_dict: bool = True):
        self._onload()
        return self.tiny.decode(z, return_dict=return_dict)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)

    def enable_slicing(self) -> None:
        for module in (self.tiny, self.original):
            module.enable_slicing()

    def disable_slicing(self) -> None:
        for module in (self.tiny, self.original):
            module.disable_slicing()

    def enable_tiling(self) -> None:
        for module in (self.tiny, self.original):
            module.enable_tiling()

    def disable_tiling(self) -> None:
        for module in (self.tiny, self.original):
            module.disable_tiling()


# ---------------------------------------------------------------- changing the pipeline


def _match_placement(new: torch.nn.Module, old: torch.nn.Module) -> torch.nn.Module:
    """Give the new VAE the dtype, device and memory format earlier stages gave the old one."""
    ref = next(old.parameters())
    # plain torch casts: diffusers' ModelMixin.to warns about fp32-only modules these VAEs do not have
    torch.nn.Module.to(new, device=ref.device, dtype=ref.dtype)
    if any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
           for p in old.parameters()):
        torch.nn.Module.to(new, memory_format=torch.channels_last)
    return new


def _swap_vae(pipe, new, patch) -> None:
    """`pipe.vae = new` (which also rewrites the pipeline config), undone exactly by `patch.remove()`."""
    old = pipe.vae
    old_config = pipe.__dict__.get("_internal_dict")
    pipe.vae = new

    def undo():
        pipe.vae = old
        if old_config is not None:
            object.__setattr__(pipe, "_internal_dict", old_config)

    patch.on_remove(undo)


def _hold(patch, module: torch.nn.Module) -> None:
    """Count the swapped-out VAE in the handle's held memory (it is kept only so removal can restore it)."""
    patch.hold(list(module.parameters()) + list(module.buffers()))


def _flag_targets(vae) -> list:
    return [vae.tiny, vae.original] if isinstance(vae, TinyDecoderVAE) else [vae]


def _set_flag(patch, module, flag: str, enable) -> None:
    """Call diffusers' `enable_*` on `module`; removal restores the flag's exact previous value (or absence)."""
    missing = object()
    old = module.__dict__.get(flag, missing)
    enable()

    def undo():
        if old is missing:
            module.__dict__.pop(flag, None)
        else:
            setattr(module, flag, old)

    patch.on_remove(undo)


def _sliced_decode_works(vae) -> bool:
    """Probe: does a sliced decode of 2 latents give 2 images? (diffusers 0.31's AutoencoderTiny gives 4.)"""
    z = torch.zeros(2, int(vae.config.latent_channels), 1, 1, dtype=vae.dtype, device=next(vae.parameters()).device)
    with torch.no_grad():
        return vae.decode(z, return_dict=False)[0].shape[0] == 2


def _apply_flags(vae, cfg: VaeConfig, patch, notes: list) -> None:
    for module in _flag_targets(vae):
        if cfg.slicing:
            _set_flag(patch, module, "use_slicing", module.enable_slicing)
        if cfg.tiling:
            _set_flag(patch, module, "use_tiling", module.enable_tiling)
    if cfg.slicing and not _sliced_decode_works(vae):
        decoder = _flag_targets(vae)[0]
        decoder.use_slicing = False  # restored with the other flags on removal
        note = ("VAE slicing left off for the Tiny VAE: this diffusers version's sliced AutoencoderTiny decode is "
                "broken (it decodes the whole batch per slice); the Tiny VAE needs little memory anyway")
        log.warning("vae: %s", note)
        notes.append(note)


# ---------------------------------------------------------------- the unit


@contextmanager
def _notes_scope(run, notes):
    for text in notes:
        run.note(text)
    yield


@register
class VaeVariant(Unit):
    config_cls = VaeConfig

    def examples(self) -> list[VaeConfig]:
        return [VaeConfig(variant="fp16_fix", path=SYNTHETIC), VaeConfig(slicing=True, tiling=True),
                VaeConfig(variant="tiny", path=SYNTHETIC)]

    def check(self, cfg: VaeConfig, ctx: ApplyContext) -> None:
        if cfg.variant == "default":
            return
        if not cfg.path.strip():
            what = "a Tiny VAE" if cfg.variant == "tiny" else "the fp16-fix VAE"
            raise ConfigError("vae.path", f"variant {cfg.variant} needs the weights of {what}",
                              (_TINY_HINT if cfg.variant == "tiny" else _FULL_HINT) +
                              "; or 'synthetic' for random weights (benchmarks only)")
        if cfg.path != SYNTHETIC and not Path(cfg.path).expanduser().exists():
            raise CheckpointError(cfg.path, "no such file or folder (vae.path)",
                                  "Check the path; " + (_TINY_HINT if cfg.variant == "tiny" else _FULL_HINT))

    def run_scope(self, cfg: VaeConfig, handle, run):
        notes = handle.info.get("run_notes")
        return _notes_scope(run, notes) if notes else None

    def _apply(self, pipe, cfg: VaeConfig, ctx: ApplyContext, patch) -> None:
        original = pipe.vae
        notes: list[str] = []
        patch.info["latent_scaling_factor"] = float(original.config.scaling_factor)
        if cfg.variant == "default" and cfg.path:
            log.info("vae: path %s ignored (variant is default)", cfg.path)
        new = self._replacement(cfg, original, ctx, notes)
        if new is not None:
            _swap_vae(pipe, new, patch)
            if not isinstance(new, TinyDecoderVAE):
                _hold(patch, original)
        _apply_flags(pipe.vae, cfg, patch, notes)
        patch.info["run_notes"] = notes
        if cfg.variant == "fp16_fix" and pipe.vae.dtype != torch.float16:
            log.info("vae: the fp16-fix VAE runs in %s here; it saves memory only in fp16 (precision vae=fp16)",
                     str(pipe.vae.dtype).replace("torch.", ""))

    def _replacement(self, cfg: VaeConfig, original, ctx: ApplyContext, notes: list):
        """The module that becomes `pipe.vae`, placed like the original; None keeps the original."""
        if cfg.variant == "default":
            return None
        new, label, decoder_only = self._load(cfg, original, ctx.family)
        _match_placement(new, original)
        if cfg.path == SYNTHETIC:
            log.warning("vae: %s for %s; for measuring cost only, images are not meaningful", label,
                        ctx.family.title)
            notes.append(f"vae: {label} (benchmark only)")
        elif decoder_only:
            text = f"decoder-only {label}: it decodes; img2img inputs are encoded with the original VAE"
            log.info("vae: %s", text)
            notes.append(text)
            new = TinyDecoderVAE(new, original)
        else:
            log.info("vae: %s", label)
        return new

    @staticmethod
    def _load(cfg: VaeConfig, original, family) -> tuple[torch.nn.Module, str, bool]:
        """(new VAE on the CPU, a label for logs, whether it lacks an encoder)."""
        latent_channels = int(original.config.latent_channels)
        if cfg.variant == "fp16_fix":
            if cfg.path == SYNTHETIC:
                build = weight_source("vae-full", SYNTHETIC, "VaeConfig.path")
                return build(original), "SYNTHETIC random-weight AutoencoderKL", False
            new, source = load_full_vae(Path(cfg.path).expanduser(), original, family)
            return new, f"fp16-fix VAE from {source}", False
        if cfg.path == SYNTHETIC:
            build = weight_source("vae-tiny", SYNTHETIC, "VaeConfig.path")
            return build(latent_channels), "SYNTHETIC random-weight Tiny VAE (TAESD architecture)", False
        weights = _tiny_weights(Path(cfg.path).expanduser(), family)
        new = _build_tiny(weights, family, latent_channels)
        label = f"Tiny VAE from {weights.decoder_source.name}"
        if weights.encoder_source not in (None, weights.decoder_source):
            label += f" + {weights.encoder_source.name}"
        return new, label, weights.encoder_source is None


__all__ = ["VaeConfig", "VaeVariant", "TinyDecoderVAE", "load_full_vae", "taesd_to_diffusers"]
