"""Sub-quadratic attention: exact softmax attention computed in query and key chunks.

The idea of Rabe & Staats ("Self-attention Does Not Need O(n^2) Memory", 2021), which A1111 exposes
as `--opt-sub-quad-attention`: never materialise the full query x key score matrix; for each query
chunk, walk the key chunks keeping a running maximum, normaliser and weighted sum (online softmax).
Peak memory for scores falls from N*M to q_chunk*kv_chunk per head; the result is the same softmax
attention up to floating-point rounding.
"""

from __future__ import annotations

import math

import torch


def chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float,
                      q_chunk: int, kv_chunk: int, upcast: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale) v for [B, H, N, D] tensors, in chunks; returns [B, H, N, Dv]."""
    out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
    n_keys = key.shape[-2]
    for qs in range(0, query.shape[-2], q_chunk):
        q = query[..., qs:qs + q_chunk, :]
        if upcast:
            q = q.float()
        if n_keys <= kv_chunk:
            k = key.float() if upcast else key
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            probs = scores.softmax(dim=-1).to(value.dtype)
            out[..., qs:qs + q_chunk, :] = torch.matmul(probs, value)
            continue
        acc = None
        running_max = None
        normaliser = None
        for ks in range(0, n_keys, kv_chunk):
            k = key[..., ks:ks + kv_chunk, :]
            v = value[..., ks:ks + kv_chunk, :]
            scores = torch.matmul(q, (k.float() if upcast else k).transpose(-1, -2)).float() * scale
            chunk_max = scores.amax(dim=-1, keepdim=True)
            if running_max is None:
                new_max = chunk_max
            else:
                new_max = torch.maximum(running_max, chunk_max)
            weights = torch.exp(scores - new_max)
            chunk_sum = weights.sum(dim=-1, keepdim=True)
            chunk_acc = torch.matmul(weights.to(v.dtype), v).float()
            if acc is None:
                acc, normaliser = chunk_acc, chunk_sum
            else:
                correction = torch.exp(running_max - new_max)
                acc = acc * correction + chunk_acc
                normaliser = normaliser * correction + chunk_sum
            running_max = new_max
        out[..., qs:qs + q_chunk, :] = (acc / normaliser).to(out.dtype)
    return out


def auto_kv_chunk(n_keys: int) -> int:
    """A1111's rule of thumb: chunks of about sqrt(keys), at least 512."""
    return max(512, int(math.ceil(math.sqrt(n_keys))))


class SubQuadraticAttnProcessor:
    """A diffusers attention processor computing attention with `chunked_attention`."""

    def __init__(self, q_chunk: int = 1024, kv_chunk: int = 0):
        self.q_chunk = q_chunk
        self.kv_chunk = kv_chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            raise NotImplementedError("sub-quadratic attention does not take attention masks (SD/SDXL use none)")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        kv_chunk = self.kv_chunk or auto_kv_chunk(key.shape[-2])
        out = chunked_attention(query, key, value, scale=attn.scale, q_chunk=self.q_chunk, kv_chunk=kv_chunk,
                                upcast=bool(attn.upcast_attention or attn.upcast_softmax))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
