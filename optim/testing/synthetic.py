"""Random-weight sources for the engine: `synthetic:<family>` models and the `synthetic` VAE variants.

Registered on request (`enable_synthetic()`), never by importing the engine, so a user's run can never
silently get random weights.
"""

from __future__ import annotations

_SYNTHETIC_SEED = 20250  # fixed, so two benchmark runs decode with the same random VAE


def enable_synthetic() -> None:
    """Let `synthetic:<family>`, `synthetic-tiny:<family>` and VaeConfig(path="synthetic") load."""
    from ..models.sources import register_source
    from ..units.vae.config import SYNTHETIC

    register_source("model", "synthetic", load_synthetic)
    register_source("model", "synthetic-tiny", load_synthetic)
    register_source("vae-full", SYNTHETIC, synthetic_full_vae)
    register_source("vae-tiny", SYNTHETIC, synthetic_tiny_vae)


def synthetic_full_vae(reference):
    """Random weights in the pipeline VAE's architecture (for benchmarks: the cost, not the images)."""
    import torch
    from diffusers import AutoencoderKL

    from ..units.vae.files import kl_config
    from .random_weights import _fill_random_

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(kl_config(reference))
    vae = vae.to_empty(device="cpu").eval()
    _fill_random_(vae, torch.Generator().manual_seed(_SYNTHETIC_SEED))
    return vae


def synthetic_tiny_vae(latent_channels: int):
    """A Tiny VAE of the TAESD architecture with random weights (benchmarks measure its cost)."""
    import torch
    from diffusers import AutoencoderTiny

    from .random_weights import _fill_random_

    with torch.device("meta"):
        tiny = AutoencoderTiny(latent_channels=latent_channels)
    tiny = tiny.to_empty(device="cpu").eval()
    _fill_random_(tiny, torch.Generator().manual_seed(_SYNTHETIC_SEED))
    return tiny


def load_synthetic(ref):
    """LoadedModel for `synthetic:<family>` / `synthetic-tiny:<family>` refs (imports torch when called)."""
    from .random_weights import load_synthetic as load

    return load(ref)
