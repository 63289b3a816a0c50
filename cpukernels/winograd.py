"""Winograd minimal-filtering convolution F(m x m, 3 x 3) for stride-1, 3x3 convolutions.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016: an m x m output tile is
computed from an (m+2) x (m+2) input tile with (m+2)^2 multiplications instead of 9 m^2:

    Y = A^T [ (G g G^T) . (B^T d B) ] A

The element-wise products over all tiles become one GEMM per tile position, summing over input
channels, so the heavy work runs in the BLAS at full speed with 2.25x (F(2,3)) or 4x (F(4,3))
fewer multiplications (5.06x for F(6,3)). Here the transforms are eager PyTorch: a gather of the
strided tile positions and one GEMM with the Kronecker form of the transform matrix; cpukernels/fused.py
has the same transforms compiled, which `winograd_conv2d(fused=True)` runs. Pure functions over torch
tensors; only the scratch workspaces keep buffers between calls.
"""

from __future__ import annotations

import math
import threading
import weakref

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


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-d activation is stored NHWC (the layout Winograd then reads and writes)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def conv_padding(conv: torch.nn.Conv2d) -> int:
    pad = conv.padding
    if isinstance(pad, str):
        return 1 if pad == "same" else 0
    return int(pad[0])


def filter_transform(weight: torch.Tensor, m: int) -> torch.Tensor:
    """U = G g G^T for every (out, in) filter: [K, C, 3, 3] -> [a*a, K, C] (a = m + 2), ready for the products.

    Two small matrix products in the weight's own dtype (fast enough to redo when a LoRA changes the weight);
    the extra rounding is far below the Winograd error itself.
    """
    _, g, _ = MATRICES[m]
    gm = _matrix(g, weight.dtype, weight.device)
    k, c = weight.shape[:2]
    u = torch.matmul(torch.matmul(gm, weight.reshape(k * c, 3, 3)), gm.t())  # [K*C, a, a]
    a = m + 2
    return u.reshape(k, c, a * a).permute(2, 0, 1).contiguous()


def filter_bytes(k: int, c: int, m: int, element_size: int = 4) -> int:
    """Memory one layer's transformed filters take for tile m (4x the weight for F(4,3), 1.8x for F(2,3))."""
    return (m + 2) ** 2 * k * c * element_size


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


def input_transform(x: torch.Tensor, m: int, tiles_h: int, tiles_w: int, row0: int = 0,
                    workspace: "Workspace | None" = None) -> torch.Tensor:
    """V = B^T d B for `tiles_h` tile rows (from tile row `row0`) of the padded input x [N, C, Hp, Wp].

    Returns [a*a, P, C] (P = N*tiles_h*tiles_w tiles, channels last): the (m+2)^2 strided tile positions
    are gathered once into a channel-minor buffer, then one GEMM with B^T kron B^T transforms every tile
    (the matrix is tiny; the pass over the data dominates). Works on NCHW and NHWC inputs alike.
    With a `workspace` the buffers are reused from call to call instead of allocated.
    """
    a = m + 2
    n, c = x.shape[:2]
    src = x.permute(0, 2, 3, 1)  # [N, Hp, Wp, C] view; contiguous when x is channels-last
    shape = (a, a, n, tiles_h, tiles_w, c)
    d = workspace.take("d", shape, x) if workspace is not None else torch.empty(shape, dtype=x.dtype,
                                                                               device=x.device)
    top = row0 * m
    for i in range(a):
        rows = src[:, top + i: top + i + (tiles_h - 1) * m + 1: m]
        for j in range(a):
            d[i, j].copy_(rows[:, :, j: j + (tiles_w - 1) * m + 1: m])
    bb, _ = transforms(m, x.dtype, x.device)
    flat = d.view(a * a, -1)
    if workspace is None:
        return torch.mm(bb, flat).view(a * a, n * tiles_h * tiles_w, c)
    v = workspace.take("v", flat.shape, x)
    torch.mm(bb, flat, out=v)
    return v.view(a * a, n * tiles_h * tiles_w, c)


def output_transform(mm: torch.Tensor, m: int, workspace: "Workspace | None" = None) -> torch.Tensor:
    """Y = A^T M A for every tile: [a*a, P, K] -> [m*m, P, K] (one GEMM with A^T kron A^T)."""
    a = m + 2
    _, aa = transforms(m, mm.dtype, mm.device)
    flat = mm.reshape(a * a, -1)
    if workspace is None:
        return torch.mm(aa, flat).view(m * m, mm.shape[1], mm.shape[2])
    y = workspace.take("y", (m * m, flat.shape[1]), mm)
    torch.mm(aa, flat, out=y)
    return y.view(m * m, mm.shape[1], mm.shape[2])


def input_transform_reference(x: torch.Tensor, m: int, tiles_h: int, tiles_w: int) -> torch.Tensor:
    """The same transform written as B^T d B with einsum, for tests."""
    bt = _matrix(MATRICES[m][0], torch.float64, x.device)
    a = m + 2
    n, c = x.shape[:2]
    sn, sc, sh, sw = x.stride()
    tiles = x.as_strided((n, c, tiles_h, tiles_w, a, a), (sn, sc, sh * m, sw * m, sh, sw)).to(torch.float64)
    v = torch.einsum("ij,nctujk,lk->ilntuc", bt, tiles, bt)
    return v.reshape(a * a, n * tiles_h * tiles_w, c).to(x.dtype)


_MKLDNN_LINEAR: list = []


def mkldnn_linear_available() -> bool:
    """Whether oneDNN's packed-weight linear is usable: on CPUs where PyTorch's BLAS takes a slower path (e.g. MKL
    on AMD runs AVX2 code), it runs the Winograd products at about twice the speed of torch.bmm."""
    if not _MKLDNN_LINEAR:
        ok = False
        try:
            if torch.backends.mkldnn.is_available():
                w = torch.randn(4, 3)
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
                out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 3), packed, None, "none", [], "")
                ok = bool(torch.allclose(out, torch.ones(2, 3) @ w.t(), atol=1e-5))
        except (RuntimeError, AttributeError):
            ok = False
        _MKLDNN_LINEAR.append(ok)
    return _MKLDNN_LINEAR[0]


def pack_filters(u: torch.Tensor, rows_hint: int) -> list | None:
    """oneDNN-packed copies of each tile position's [K, C] filter matrix, or None where unsupported."""
    if u.device.type != "cpu" or u.dtype != torch.float32 or not mkldnn_linear_available():
        return None
    return [torch.ops.mkldnn._reorder_linear_weight(u[i].contiguous(), rows_hint) for i in range(u.shape[0])]


def _products(v: torch.Tensor, u: torch.Tensor, packed: list | None,
              workspace: "Workspace | None" = None) -> torch.Tensor:
    """M[xi] = V[xi] @ U[xi]^T for every tile position: [a*a, P, C] x [a*a, K, C] -> [a*a, P, K]."""
    out = workspace.take("m", (v.shape[0], v.shape[1], u.shape[1]), v) if workspace is not None else None
    if packed is not None:
        parts = [torch.ops.mkldnn._linear_pointwise(v[i], packed[i], None, "none", [], "") for i in range(v.shape[0])]
        return torch.stack(parts) if out is None else torch.stack(parts, out=out)
    if out is None:
        return torch.bmm(v, u.transpose(1, 2))
    return torch.bmm(v, u.transpose(1, 2), out=out)


class Workspace:
    """Scratch buffers for the transforms, reused across calls and layers (one set per thread).

    Inside a whole model, allocating the transformed buffers afresh on every call cost more than the
    saved multiplications: large blocks come from fresh pages each time (page faults, zeroing), while a
    loop over one layer reuses the same blocks. Each role keeps one flat buffer grown to the largest
    request; `nbytes()` is the extra memory held.
    """

    def __init__(self):
        self._buffers: dict = {}

    def take(self, role: str, shape, like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        key = (role, like.dtype, like.device, torch.is_inference_mode_enabled())  # inference tensors stay apart
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


_WORKSPACES = threading.local()
_ALL_WORKSPACES: "weakref.WeakSet[Workspace]" = weakref.WeakSet()


def thread_workspace() -> Workspace:
    """This thread's workspace (threads never share buffers)."""
    ws = getattr(_WORKSPACES, "ws", None)
    if ws is None:
        ws = _WORKSPACES.ws = Workspace()
        _ALL_WORKSPACES.add(ws)
    return ws


def workspace_bytes() -> int:
    """Scratch memory held by every thread's workspace."""
    return sum(ws.nbytes() for ws in list(_ALL_WORKSPACES))


def release_workspaces() -> None:
    """Give every thread's scratch buffers back, the native kernel's included (when the last Winograd patch is
    removed)."""
    from .native import release_scratch

    for ws in list(_ALL_WORKSPACES):
        ws.clear()
    release_scratch()


def native_conv2d(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, *, m: int, padding: int,
                  block: int) -> torch.Tensor:
    """The native kernel (cpukernels/native.py; the caller has loaded it) on x with `filters`: its transformed
    filters for tile m, or the layer's fp32 weight to transform inside the call. `block` > 0: work items of that
    many output tiles; < 0: of -block output channels over every tile."""
    from .native import native_ops

    return native_ops(build=False).conv2d(x, filters, bias, m, padding, abs(block), False, block < 0)


def _bands(tiles_h: int, band: int) -> list[tuple[int, int]]:
    """(first tile row, tile rows) per band; a last band of one tile row joins the one before it (one shape
    fewer for the compiled transforms to specialise on)."""
    spans = [(t0, min(band, tiles_h - t0)) for t0 in range(0, tiles_h, band)]
    if len(spans) > 1 and spans[-1][1] == 1:
        t0, rows = spans[-2]
        spans[-2:] = [(t0, rows + 1)]
    return spans


def winograd_conv2d(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, *, m: int, padding: int,
                    band_tiles: int | None = None, packed: list | None = None,
                    workspace: Workspace | None = None, fused: bool = False) -> torch.Tensor:
    """3x3 stride-1 convolution of x [N, C, H, W] with pre-transformed filters u (from `filter_transform`).

    `band_tiles` processes the image in horizontal bands of that many tile rows, so the transformed
    input and products of one band stay cache-sized (what makes Winograd pay on large, thin layers).
    Bands run one after another: running them on a Python thread pool won 10-20% per layer in
    isolation but lost it all (SD1.5 UNet step 1.19x -> 1.05x) inside a whole model, where the pool
    fights OpenMP's spinning workers. `packed` (from `pack_filters`) runs the products through oneDNN.
    `workspace` reuses the scratch buffers (see `Workspace`). `fused` runs the transforms compiled
    (cpukernels/fused.py; check `fused_transforms_work()` first). A channels-last input gives a
    channels-last output.
    """
    n, c, h, w = x.shape
    ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
    tiles_h, tiles_w = math.ceil(ho / m), math.ceil(wo / m)
    hp, wp = tiles_h * m + 2, tiles_w * m + 2
    k = u.shape[1]
    nhwc = is_channels_last(x)
    out = torch.empty(n, ho, wo, k, dtype=x.dtype, device=x.device) if nhwc else \
        torch.empty(n, k, ho, wo, dtype=x.dtype, device=x.device)
    band = tiles_h if not band_tiles else max(1, min(band_tiles, tiles_h))
    if fused:
        from .fused import compiled_input_band, compiled_output_band, fused_transforms_work, give_up

        if fused_transforms_work():
            try:
                # padded copy in NHWC order (a plain pad for a channels-last input, a transposing one otherwise)
                xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, padding, wp - w - padding, padding, hp - h - padding))
                out_nhwc = out if nhwc else out.permute(0, 2, 3, 1)
                for t0, tb in _bands(tiles_h, band):
                    v = compiled_input_band(xp[:, t0 * m: t0 * m + tb * m + 2], m, tb, tiles_w)
                    compiled_output_band(_products(v, u, packed, workspace), bias,
                                         out_nhwc[:, t0 * m: t0 * m + tb * m], m, n, tb, tiles_w)
                return out.permute(0, 3, 1, 2) if nhwc else out
            except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop the generation
                give_up(exc)
    xp = F.pad(x, (padding, wp - w - padding, padding, hp - h - padding))
    exact = ho == tiles_h * m and wo == tiles_w * m  # no ragged tiles: write straight into the output
    for t0, tb in _bands(tiles_h, band):
        v = input_transform(xp, m, tb, tiles_w, t0, workspace)
        y = output_transform(_products(v, u, packed, workspace), m, workspace)
        if bias is not None:
            y.add_(bias)
        y = y.view(m, m, n, tb, tiles_w, k)
        if exact and nhwc:  # [m, m, n, tb, tw, k] -> out[n, tb, m, tw, m, k]
            out.view(n, tiles_h, m, tiles_w, m, k)[:, t0: t0 + tb].copy_(y.permute(2, 3, 0, 4, 1, 5))
        elif exact:  # -> out[n, k, tb, m, tw, m]
            out.view(n, k, tiles_h, m, tiles_w, m)[:, :, t0: t0 + tb].copy_(y.permute(2, 5, 3, 0, 4, 1))
        else:
            rows = min(tb * m, ho - t0 * m)
            if nhwc:  # [n, tb, m, tw, m, k] -> rows of the NHWC output
                block = y.permute(2, 3, 0, 4, 1, 5).reshape(n, tb * m, tiles_w * m, k)
                out[:, t0 * m: t0 * m + rows].copy_(block[:, :rows, :wo])
            else:  # [n, k, tb, m, tw, m] -> rows of the NCHW output
                block = y.permute(2, 5, 3, 0, 4, 1).reshape(n, k, tb * m, tiles_w * m)
                out[:, :, t0 * m: t0 * m + rows].copy_(block[:, :, :rows, :wo])
    return out.permute(0, 3, 1, 2) if nhwc else out
