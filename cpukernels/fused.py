"""Winograd's input and output transforms, each fused into one compiled loop (torch.compile, inductor).

In eager PyTorch a transform is a gather of (m+2)^2 strided tile slices followed by a GEMM with the
Kronecker matrix: several passes over buffers larger than the cache, and 36x36 multiply-adds per
tile value where the separable form needs a tenth of that. On the VAE's large, thin layers those
passes cost more than the multiplications Winograd saves. Compiled, each transform reads its band
of the input once and writes the result once, with the separable sums unrolled: about 4x faster
(C128 at 512x512: 79 ms -> 19 ms per layer for the input transform on a 2-core CPU).

Compiling needs a working C++ compiler (inductor's CPU backend). `fused_transforms_work()` tries
once per process; where it fails, callers use the eager transforms (cpukernels/winograd.py) and say so.
Shapes are compiled dynamically: one compilation per tile size and memory layout, about 20 s the
first time on a 2-core CPU, then reused (and kept in inductor's on-disk cache between runs).
"""

from __future__ import annotations

import logging
import threading

import torch

from .winograd import MATRICES

log = logging.getLogger(__name__)


def _weighted_sum(coeffs, parts):
    """sum_j coeffs[j] * parts[j], skipping zero coefficients (unrolled into the compiled loop)."""
    out = None
    for coeff, part in zip(coeffs, parts):
        if coeff == 0:
            continue
        term = part if coeff == 1 else (-part if coeff == -1 else part * coeff)
        out = term if out is None else out + term
    return out


def input_band(xb: torch.Tensor, m: int, tiles_h: int, tiles_w: int) -> torch.Tensor:
    """V = B^T d B for every tile of a band of the padded input, separably: rows first, then columns.

    xb: [N, tiles_h*m + 2, Wp, C], channels minor (a view of the padded NHWC input).
    Returns [a*a, N*tiles_h*tiles_w, C], ready for the products.
    """
    a = m + 2
    bt = MATRICES[m][0]
    rows = [xb[:, r: r + (tiles_h - 1) * m + 1: m] for r in range(a)]  # each [N, th, Wp, C]
    row_sums = [_weighted_sum(bt[i], rows) for i in range(a)]
    tiles = []
    for i in range(a):
        cols = [row_sums[i][:, :, s: s + (tiles_w - 1) * m + 1: m] for s in range(a)]  # each [N, th, tw, C]
        tiles.extend(_weighted_sum(bt[j], cols) for j in range(a))
    return torch.stack(tiles).view(a * a, -1, xb.shape[-1])


def output_band(mm: torch.Tensor, bias: torch.Tensor | None, dst: torch.Tensor, m: int, n: int, tiles_h: int,
                tiles_w: int) -> None:
    """Y = A^T M A (+ bias) for every tile of a band, written into `dst` [N, rows, cols, K] (a view of the
    output band in either memory layout; rows and cols may cut the last, ragged tiles)."""
    a = m + 2
    at = MATRICES[m][2]
    k = mm.shape[-1]
    prods = mm.view(a, a, n, tiles_h, tiles_w, k)
    col_sums = [_weighted_sum(at[p], [prods[i] for i in range(a)]) for p in range(m)]  # each [a, n, th, tw, K]
    y = torch.stack([torch.stack([_weighted_sum(at[q], [col_sums[p][j] for j in range(a)]) for q in range(m)])
                     for p in range(m)])  # [m, m, n, th, tw, K]
    if bias is not None:
        y = y + bias
    block = y.permute(2, 3, 0, 4, 1, 5).reshape(n, tiles_h * m, tiles_w * m, k)
    dst.copy_(block[:, :dst.shape[1], :dst.shape[2]])


# One small function per tile size: dynamo keeps its compiled variants per code object (at most 8), and each
# tile size has its own variants (batch 1 or more, NCHW or NHWC, bias or none).
def _input_f2(xb, tiles_h, tiles_w):
    return input_band(xb, 2, tiles_h, tiles_w)


def _input_f4(xb, tiles_h, tiles_w):
    return input_band(xb, 4, tiles_h, tiles_w)


def _input_f6(xb, tiles_h, tiles_w):
    return input_band(xb, 6, tiles_h, tiles_w)


def _output_f2(mm, bias, dst, n, tiles_h, tiles_w):
    output_band(mm, bias, dst, 2, n, tiles_h, tiles_w)


def _output_f4(mm, bias, dst, n, tiles_h, tiles_w):
    output_band(mm, bias, dst, 4, n, tiles_h, tiles_w)


def _output_f6(mm, bias, dst, n, tiles_h, tiles_w):
    output_band(mm, bias, dst, 6, n, tiles_h, tiles_w)


_SOURCES = {("in", 2): _input_f2, ("in", 4): _input_f4, ("in", 6): _input_f6,
            ("out", 2): _output_f2, ("out", 4): _output_f4, ("out", 6): _output_f6}
_LOCK = threading.Lock()
_COMPILED: dict = {}
_STATE: dict = {}


def _compiled(role: str, m: int):
    with _LOCK:
        fn = _COMPILED.get((role, m))
        if fn is None:
            fn = _COMPILED[(role, m)] = torch.compile(_SOURCES[(role, m)], dynamic=True, fullgraph=True)
        return fn


def _compile_settings():
    """Dynamo settings for these calls only: no "duck sizing" (two sizes that happen to be equal, say channels
    and tile columns, would otherwise become a guard and force a recompilation per layer shape), and room for
    the few real variants (batch 1 or more, NCHW or NHWC, bias or none)."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    return torch._dynamo.config.patch(recompile_limit=32), fx_config.patch(use_duck_shape=False)


def compiled_input_band(xb: torch.Tensor, m: int, tiles_h: int, tiles_w: int) -> torch.Tensor:
    """`input_band`, compiled (see `fused_transforms_work` first)."""
    dynamo_settings, shape_settings = _compile_settings()
    with dynamo_settings, shape_settings:
        return _compiled("in", m)(xb, tiles_h, tiles_w)


def compiled_output_band(mm: torch.Tensor, bias: torch.Tensor | None, dst: torch.Tensor, m: int, n: int,
                         tiles_h: int, tiles_w: int) -> None:
    """`output_band`, compiled (see `fused_transforms_work` first)."""
    dynamo_settings, shape_settings = _compile_settings()
    with dynamo_settings, shape_settings:
        _compiled("out", m)(mm, bias, dst, n, tiles_h, tiles_w)


def give_up(exc: BaseException) -> None:
    """A compiled call failed at run time: say why once and let every later call use the eager transforms."""
    with _LOCK:
        was_on = _STATE.get("ok", True)
        _STATE["ok"] = False
    if was_on:
        log.warning("Winograd: the compiled transforms failed (%s: %s); using the eager PyTorch transforms from now on",
                    type(exc).__name__, exc)


def fused_transforms_work() -> bool:
    """Whether the compiled transforms build and run here (tried once per process; False without a working
    C++ compiler, or where torch.compile is unsupported). The first call pays the compilation; later calls
    (one per layer call) only read the answer."""
    known = _STATE.get("ok")
    if known is not None:
        return known
    ok = False
    try:
        x = torch.arange(2 * 10 * 10 * 3, dtype=torch.float32).reshape(2, 10, 10, 3)
        with torch.inference_mode():
            v = compiled_input_band(x, 4, 2, 2)
            ok = v.shape == (36, 8, 3) and bool(torch.allclose(v, input_band(x, 4, 2, 2)))
    except Exception as exc:  # noqa: BLE001 - any compiler failure means "use the eager transforms"
        log.warning("Winograd: compiled transforms unavailable here (%s: %s); using the eager PyTorch transforms",
                    type(exc).__name__, exc)
        ok = False
    with _LOCK:
        _STATE["ok"] = ok
    return ok
