"""Winograd minimal-filtering convolution F(m x m, 3 x 3) for stride-1, 3x3 convolutions.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016: an m x m output tile is
computed from an (m+2) x (m+2) input tile with (m+2)^2 multiplications instead of 9 m^2:

    Y = A^T [ (G g G^T) . (B^T d B) ] A

The element-wise products over all tiles become one GEMM per tile position, summing over input
channels, so the heavy work runs in the BLAS at full speed with 2.25x (F(2,3)) or 4x (F(4,3))
fewer multiplications. The transforms are small integer/fraction matrices applied as additions of
strided slices. Pure functions over torch tensors; nothing here keeps state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Transform matrices (interpolation points in brackets), from Lavin & Gray (2016) and the
# Cook-Toom construction they use.
# F(2x2, 3x3), points (0, 1, -1, inf)
BT_2 = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
G_2 = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]
AT_2 = [[1, 1, 1, 0], [0, 1, -1, -1]]
# F(4x4, 3x3), points (0, 1, -1, 2, -2, inf)
BT_4 = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
G_4 = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
       [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
AT_4 = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
# F(6x6, 3x3), points (0, 1, -1, 1/2, -1/2, 2, -2, inf)
BT_6 = [[1, 0, -21 / 4, 0, 21 / 4, 0, -1, 0], [0, 1, 1, -17 / 4, -17 / 4, 1, 1, 0],
        [0, -1, 1, 17 / 4, -17 / 4, -1, 1, 0], [0, 1 / 2, 1 / 4, -5 / 2, -5 / 4, 2, 1, 0],
        [0, -1 / 2, 1 / 4, 5 / 2, -5 / 4, -2, 1, 0], [0, 2, 4, -5 / 2, -5, 1 / 2, 1, 0],
        [0, -2, 4, 5 / 2, -5, -1 / 2, 1, 0], [0, -1, 0, 21 / 4, 0, -21 / 4, 0, 1]]
G_6 = [[1, 0, 0], [-2 / 9, -2 / 9, -2 / 9], [-2 / 9, 2 / 9, -2 / 9], [1 / 90, 1 / 45, 2 / 45],
       [1 / 90, -1 / 45, 2 / 45], [32 / 45, 16 / 45, 8 / 45], [32 / 45, -16 / 45, 8 / 45], [0, 0, 1]]
AT_6 = [[1, 1, 1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 1 / 2, -1 / 2, 0], [0, 1, 1, 4, 4, 1 / 4, 1 / 4, 0],
        [0, 1, -1, 8, -8, 1 / 8, -1 / 8, 0], [0, 1, 1, 16, 16, 1 / 16, 1 / 16, 0],
        [0, 1, -1, 32, -32, 1 / 32, -1 / 32, 1]]

MATRICES = {2: (BT_2, G_2, AT_2), 4: (BT_4, G_4, AT_4), 6: (BT_6, G_6, AT_6)}
TILES = tuple(MATRICES)


def _matrix(rows, dtype, device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=dtype)


def is_eligible(conv: torch.nn.Conv2d) -> bool:
    """Whether Winograd F(m, 3) computes this convolution: 3x3, stride 1, dilation 1, groups 1, zero padding."""
    pad = conv.padding
    if isinstance(pad, str):
        pad_ok = pad in ("same", "valid")
    else:
        pad_ok = len(set(pad)) == 1 and pad[0] in (0, 1)
    return (isinstance(conv, torch.nn.Conv2d) and tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1)
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros" and pad_ok)


def conv_padding(conv: torch.nn.Conv2d) -> int:
    pad = conv.padding
    if isinstance(pad, str):
        return 1 if pad == "same" else 0
    return int(pad[0])


def filter_transform(weight: torch.Tensor, m: int) -> torch.Tensor:
    """U = G g G^T for every (out, in) filter: [K, C, 3, 3] -> [a*a, K, C] (a = m + 2), ready for bmm.

    Computed in float64 and rounded once, so the transformed filter carries no extra error.
    """
    _, g, _ = MATRICES[m]
    gm = _matrix(g, torch.float64, weight.device)
    u = torch.einsum("ij,kcjl,ml->imkc", gm, weight.to(torch.float64), gm)
    a = m + 2
    return u.reshape(a * a, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


def _combine(parts, coeffs) -> torch.Tensor:
    """sum_j coeffs[j] * parts[j] as a new tensor, skipping zero coefficients and multiplying only by non-units."""
    out = None
    for c, part in zip(coeffs, parts):
        if c == 0:
            continue
        if out is None:
            out = part.clone() if c == 1 else part * c
        elif c == 1:
            out.add_(part)
        elif c == -1:
            out.sub_(part)
        else:
            out.add_(part, alpha=c)
    return out


def _kron(rows_a, rows_b, dtype, device) -> torch.Tensor:
    """(A kron B): applies A along a tile's rows and B along its columns as one matrix on flattened tiles."""
    return torch.kron(_matrix(rows_a, torch.float64, device), _matrix(rows_b, torch.float64, device)).to(dtype)


_TRANSFORMS: dict = {}


def transforms(m: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B^T kron B^T, A^T kron A^T) for tile m, cached per dtype/device."""
    key = (m, dtype, torch.device(device))
    if key not in _TRANSFORMS:
        bt, _, at = MATRICES[m]
        _TRANSFORMS[key] = (_kron(bt, bt, dtype, device), _kron(at, at, dtype, device))
    return _TRANSFORMS[key]


def input_transform(x: torch.Tensor, m: int, tiles_h: int, tiles_w: int) -> torch.Tensor:
    """V = B^T d B for every tile of the padded input x [N, C, Hp, Wp] -> [a*a, C, N*tiles_h*tiles_w].

    The (m+2)^2 strided tile positions are gathered once into a channel-major buffer, then one GEMM with
    B^T kron B^T transforms every tile at BLAS speed (the transform matrix is tiny; the data pass dominates).
    """
    a = m + 2
    n, c = x.shape[:2]
    d = torch.empty(a, a, c, n, tiles_h, tiles_w, dtype=x.dtype, device=x.device)
    for i in range(a):
        rows = x[:, :, i: i + (tiles_h - 1) * m + 1: m, :]
        for j in range(a):
            d[i, j].copy_(rows[..., j: j + (tiles_w - 1) * m + 1: m].transpose(0, 1))
    bb, _ = transforms(m, x.dtype, x.device)
    return torch.mm(bb, d.view(a * a, -1)).view(a * a, c, n * tiles_h * tiles_w)


def output_transform(mm: torch.Tensor, m: int, n: int, tiles_h: int, tiles_w: int) -> torch.Tensor:
    """Y = A^T M A: [a*a, K, N*th*tw] -> [N, K, th*m, tw*m], one GEMM with A^T kron A^T, then tiles scattered."""
    a = m + 2
    k = mm.shape[1]
    _, aa = transforms(m, mm.dtype, mm.device)
    y = torch.mm(aa, mm.view(a * a, -1)).view(m, m, k, n, tiles_h, tiles_w)
    return y.permute(3, 2, 4, 0, 5, 1).reshape(n, k, tiles_h * m, tiles_w * m)


def input_transform_reference(x: torch.Tensor, m: int, tiles_h: int, tiles_w: int) -> torch.Tensor:
    """The same transform written as B^T d B with einsum, for tests."""
    bt = _matrix(MATRICES[m][0], torch.float64, x.device)
    a = m + 2
    n, c = x.shape[:2]
    sn, sc, sh, sw = x.stride()
    tiles = x.as_strided((n, c, tiles_h, tiles_w, a, a), (sn, sc, sh * m, sw * m, sh, sw)).to(torch.float64)
    v = torch.einsum("ij,nctujk,lk->ilcntu", bt, tiles, bt)
    return v.reshape(a * a, c, n * tiles_h * tiles_w).to(x.dtype)


def winograd_conv2d(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, *, m: int, padding: int,
                    band_tiles: int | None = None) -> torch.Tensor:
    """3x3 stride-1 convolution of x [N, C, H, W] with pre-transformed filters u (from `filter_transform`).

    `band_tiles` processes the image in horizontal bands of that many tile rows, so the transformed
    input and product of one band stay cache-sized (what makes Winograd pay on large, thin layers).
    """
    n, c, h, w = x.shape
    ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
    tiles_h, tiles_w = math.ceil(ho / m), math.ceil(wo / m)
    hp, wp = tiles_h * m + 2, tiles_w * m + 2
    xp = F.pad(x, (padding, wp - w - padding, padding, hp - h - padding))
    k = u.shape[1]
    band = tiles_h if not band_tiles else max(1, min(band_tiles, tiles_h))
    if band >= tiles_h:
        v = input_transform(xp, m, tiles_h, tiles_w)
        y = output_transform(torch.bmm(u, v), m, n, tiles_h, tiles_w)
    else:
        y = torch.empty(n, k, tiles_h * m, tiles_w * m, dtype=x.dtype, device=x.device)
        for t0 in range(0, tiles_h, band):
            tb = min(band, tiles_h - t0)
            xb = xp[:, :, t0 * m: t0 * m + tb * m + 2, :]
            v = input_transform(xb, m, tb, tiles_w)
            y[:, :, t0 * m:(t0 + tb) * m, :] = output_transform(torch.bmm(u, v), m, n, tb, tiles_w)
    y = y[:, :, :ho, :wo]
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y.contiguous()
