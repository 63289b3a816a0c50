"""Image fidelity against a reference: PSNR and SSIM, for the bench's "what does this switch cost" columns."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr_db(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in 0..1 (inf when identical)."""
    mse = float(((image.float() - reference.float()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean structural similarity (Wang et al., 2004; 11x11 Gaussian window, sigma 1.5) over channels.

    Images are [H, W, C] or [B, H, W, C] in 0..1.
    """
    x, y = image.float(), reference.float()
    if x.dim() == 3:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    x, y = x.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2)
    channels = x.shape[1]
    size = min(11, x.shape[-1], x.shape[-2])
    window = _gaussian_window(size).to(x).expand(channels, 1, size, size)
    c1, c2 = 0.01 ** 2, 0.03 ** 2

    def blur(t):
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(score.mean())
