"""Bipartite soft matching on a 2-D token grid (ToMe for SD): which tokens merge, and the two maps.

The grid is cut into `stride x stride` windows; the first token of each window is a destination, the rest are
sources. Each source is scored against every destination by cosine similarity; the `r` sources with the best
match are averaged into their destination (`merge`), and after attention each merged source takes its
destination's result back (`unmerge`). The windows are fixed (no random pick), so runs are reproducible.
"""

from __future__ import annotations

import math

import torch


def _partition(h: int, w: int, stride: int, device) -> tuple[torch.Tensor, int]:
    """Token indices with the destinations first, and how many destinations there are."""
    rows, cols = h // stride, w // stride
    marks = torch.zeros(h, w, dtype=torch.int64, device=device)
    marks[: rows * stride: stride, : cols * stride: stride] = -1  # the first token of each full window
    order = marks.reshape(-1).argsort(stable=True)
    return order, rows * cols


def matching(x: torch.Tensor, h: int, w: int, stride: int, r: int):
    """(merge, unmerge) for tokens `x` (batch, h*w, channels) on an h x w grid, merging `r` of them."""
    batch, count, _ = x.shape
    order, dst_count = _partition(h, w, stride, x.device)
    r = min(r, count - dst_count)
    if r <= 0 or dst_count == 0:
        return (lambda t: t), (lambda t: t)
    dst_pos, src_pos = order[:dst_count], order[dst_count:]
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = metric[:, src_pos] @ metric[:, dst_pos].transpose(-1, -2)
        best, best_dst = scores.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)
        merged_src, kept_src = ranked[:, :r], ranked[:, r:]
        target = best_dst.gather(1, merged_src)

    def expand(index, channels):
        return index[..., None].expand(-1, -1, channels)

    def merge(t: torch.Tensor) -> torch.Tensor:
        channels = t.shape[-1]
        src, dst = t[:, src_pos], t[:, dst_pos]
        kept = src.gather(1, expand(kept_src, channels))
        moving = src.gather(1, expand(merged_src, channels))
        dst = dst.scatter_reduce(1, expand(target, channels), moving, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        channels = t.shape[-1]
        kept, dst = t[:, : kept_src.shape[1]], t[:, kept_src.shape[1]:]
        out = t.new_empty(t.shape[0], count, channels)
        out[:, dst_pos] = dst
        src_index = src_pos[None].expand(t.shape[0], -1)
        out.scatter_(1, expand(src_index.gather(1, kept_src), channels), kept)
        out.scatter_(1, expand(src_index.gather(1, merged_src), channels), dst.gather(1, expand(target, channels)))
        return out

    return merge, unmerge


def grid_of(count: int, latent_hw: tuple[int, int], max_downsample: int) -> tuple[int, int] | None:
    """(h, w) of a block's token grid from the latent's size, or None when the block is deeper than allowed or
    its tokens are no grid of that latent."""
    height, width = latent_hw
    downsample = 1
    while downsample <= max_downsample:
        h, w = math.ceil(height / downsample), math.ceil(width / downsample)
        if h * w == count:
            return h, w
        downsample *= 2
    return None
