"""Which denoising steps run with classifier-free guidance: the one rule the engine's sampler and the host
patches share."""

from __future__ import annotations

import math


def guided_steps(total: int, cfg: float, cutoff: float = 1.0, cutoff_step: int | None = None) -> int:
    """How many of the first `total` steps run with guidance; the rest run the conditional pass only."""
    if cfg <= 1.0:
        return 0
    if cutoff_step is not None:
        return max(0, min(cutoff_step, total))
    return min(total, int(math.floor(cutoff * total + 0.5)))
