"""Guidance in a stream: none, full CFG, and residual CFG (RCFG, StreamDiffusion section 3.3).

RCFG replaces the negative-prompt UNet pass by a *virtual residual noise*: the noise that would carry a reference
x0 to the current latent, `(x_t - sqrt(a_t) * x0_ref) / sqrt(1 - a_t)`. "self" takes the input frame's own latent as
the reference (no negative pass at all); "onetime" runs the negative pass once, at a frame's first step, and takes
its x0 estimate as the reference for the frame's later steps. The guided noise is
`delta * e_neg + cfg * (e_cond - delta * e_neg)`: with delta 1 this is plain CFG's formula, and delta < 1 weakens the
virtual negative.
"""

from __future__ import annotations

CFG_MODES = ("none", "full", "self", "onetime")


def residual_noise(latents, x0_reference, alpha, sigma):
    """The noise that takes `x0_reference` to `latents` at a timestep with sqrt(a) = alpha, sqrt(1-a) = sigma."""
    return (latents - alpha * x0_reference) / sigma


def guided(eps_cond, eps_negative, cfg: float, delta: float = 1.0):
    """`delta * e_neg + cfg * (e_cond - delta * e_neg)` (plain CFG when delta is 1)."""
    negative = eps_negative * delta
    return negative + cfg * (eps_cond - negative)


def x0_estimate(latents, epsilon, alpha, sigma):
    """x0 from a latent and its noise estimate (epsilon prediction)."""
    return (latents - sigma * epsilon) / alpha


__all__ = ["CFG_MODES", "residual_noise", "guided", "x0_estimate"]
