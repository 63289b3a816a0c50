"""The stochastic similarity filter (StreamDiffusion section 3.5): skip a frame that barely changed.

A frame whose cosine similarity `s` to the last *processed* frame is above the threshold `eta` is skipped with
probability `(s - eta) / (1 - eta)` (0 at the threshold, 1 for an identical frame), so a static scene costs almost
nothing while a slow change still gets through now and then; after `max_skip` skips in a row the next frame is
processed whatever its similarity. A skipped frame repeats the last output.
"""

from __future__ import annotations

import random


def skip_probability(similarity: float, threshold: float) -> float:
    """The chance of skipping a frame with cosine `similarity` to the last processed one."""
    if threshold >= 1.0:
        return 1.0 if similarity >= 1.0 else 0.0
    return min(1.0, max(0.0, (similarity - threshold) / (1.0 - threshold)))


def cosine_similarity(a, b) -> float:
    """Cosine similarity of two frames (any equal shapes), as floats."""
    import torch

    x, y = a.reshape(-1).float(), b.reshape(-1).float()
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


class SimilarityFilter:
    """Decides, frame by frame, whether to skip; seeded, so a run can be repeated."""

    def __init__(self, threshold: float = 0.98, max_skip: int = 10, seed: int = 0):
        self.threshold, self.max_skip = threshold, max_skip
        self._random = random.Random(seed)
        self._reference = None
        self._skipped_in_row = 0
        self.checked = self.skipped = 0

    def should_skip(self, frame) -> bool:
        """Whether to skip `frame` (a tensor); a processed frame becomes the new reference."""
        self.checked += 1
        if self._reference is not None and self._reference.shape == frame.shape \
                and self._skipped_in_row < self.max_skip:
            chance = skip_probability(cosine_similarity(frame, self._reference), self.threshold)
            if chance > 0 and self._random.random() < chance:
                self._skipped_in_row += 1
                self.skipped += 1
                return True
        self._reference = frame
        self._skipped_in_row = 0
        return False

    @property
    def skip_rate(self) -> float:
        return self.skipped / self.checked if self.checked else 0.0


__all__ = ["skip_probability", "cosine_similarity", "SimilarityFilter"]
