"""The weight change of a LyCORIS LoHa or LoKr layer, as LyCORIS defines it.

- LoHa (Hadamard product): `(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank`, rank = w1_b's first dimension; with
  Tucker factors (`t1`, `t2`, for convolutions) each product is `t` contracted with both factors, giving the
  kernel's spatial dimensions from `t`.
- LoKr (Kronecker product): `kron(w1, w2) * alpha / rank`, where each side is stored whole or as two factors (w2 also
  as Tucker); rank is that of the factored side (scale 1 when both sides are whole or no alpha is stored).
Either way the result is laid out as the adapted weight (out, in[, kh, kw]) and added like a plain LoRA's.
"""

from __future__ import annotations


def _tucker(t, a, b):
    """t (ra, rb, kh, kw) with a (ra, out) and b (rb, in) -> (out, in, kh, kw)."""
    import torch

    return torch.einsum("ijkl,ip,jr->prkl", t, a, b).contiguous()  # (kron needs dense strides)


def _loha(f: dict):
    import torch

    halves = []
    for side in ("1", "2"):
        a, b = f[f"hada_w{side}_a"].float(), f[f"hada_w{side}_b"].float()
        t = f.get(f"hada_t{side}")
        halves.append(_tucker(t.float(), a, b) if t is not None else torch.mm(a, b.flatten(1)))
    return halves[0] * halves[1], int(f["hada_w1_b"].shape[0])


def _lokr_side(f: dict, side: str):
    """(that side's matrix, its rank if stored as factors else None)."""
    import torch

    whole = f.get(f"lokr_{side}")
    if whole is not None:
        return whole.float(), None
    a, b = f[f"lokr_{side}_a"].float(), f[f"lokr_{side}_b"].float()
    t = f.get(f"lokr_t{side[-1]}")
    if t is not None:
        return _tucker(t.float(), a, b), int(b.shape[0])
    return torch.mm(a, b.flatten(1)), int(b.shape[0])


def _lokr(f: dict):
    import torch

    w1, rank1 = _lokr_side(f, "w1")
    w2, rank2 = _lokr_side(f, "w2")
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    rank = rank1 if rank1 is not None else rank2
    return torch.kron(w1, w2), rank


def delta(layer, device=None):
    """The layer's full weight change (fp32, strength 1), flattened to (out, -1); on `device` ("meta" gives the
    shape only, computing nothing)."""
    factors = {role: value.to(device) if device is not None else value for role, value in layer.factors.items()}
    change, rank = (_loha if layer.kind == "loha" else _lokr)(factors)
    scale = 1.0 if layer.alpha is None or rank is None else layer.alpha / rank
    return change.reshape(change.shape[0], -1) * scale


__all__ = ["delta"]
