"""Attention backends compute the same attention as SDPA; unavailable ones fall back or are refused."""

from __future__ import annotations

import pytest
import torch
from sdaccel.optim.core.registry import ApplyContext, apply_all, remove_all
from sdaccel.optim.models.families import get_family
from sdaccel.optim.spec.errors import ConfigError, UnavailableError
from sdaccel.optim.testing.random_weights import build_pipeline
from sdaccel.optim.units.attention.subquadratic import chunked_attention
from sdaccel.optim.units.attention.unit import AttentionConfig

CTX = ApplyContext(device=torch.device("cpu"), family=get_family("sd15"))


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("sd15", tiny=True, seed=4)


def _run(pipe):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    with torch.inference_mode():
        return pipe.unet(sample, 300, encoder_hidden_states=ctx).sample, pipe.vae.decode(sample).sample


def _with(pipe, cfg):
    handles = apply_all(pipe, [cfg], CTX)
    try:
        return _run(pipe)
    finally:
        remove_all(handles)


@pytest.mark.parametrize("cfg", [AttentionConfig(backend="baseline"), AttentionConfig(backend="sliced"),
                                 AttentionConfig(backend="sliced", slice_size=3),
                                 AttentionConfig(backend="sub_quadratic"),
                                 AttentionConfig(backend="sub_quadratic", query_chunk=16, kv_chunk=16)],
                         ids=lambda c: f"{c.backend}-{c.slice_size}-{c.query_chunk}")
def test_backends_match_sdpa(pipe, cfg):
    ref_unet, ref_vae = _with(pipe, AttentionConfig(backend="sdpa"))
    unet, vae = _with(pipe, cfg)
    torch.testing.assert_close(unet, ref_unet, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vae, ref_vae, rtol=1e-4, atol=1e-5)


def test_processors_are_set_and_restored(pipe):
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    handles = apply_all(pipe, [AttentionConfig(backend="sub_quadratic")], CTX)
    names = {type(v).__name__ for v in pipe.unet.attn_processors.values()}
    vae_names = {type(v).__name__ for v in pipe.vae.attn_processors.values()}
    remove_all(handles)
    assert names == {"SubQuadraticAttnProcessor"} and vae_names == {"SubQuadraticAttnProcessor"}
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before
    vae_before = {k: type(v) for k, v in pipe.vae.attn_processors.items()}
    handles = apply_all(pipe, [AttentionConfig(backend="baseline", vae=False)], CTX)
    try:
        assert {type(v).__name__ for v in pipe.unet.attn_processors.values()} == {"AttnProcessor"}
        assert {k: type(v) for k, v in pipe.vae.attn_processors.items()} == vae_before
    finally:
        remove_all(handles)


@pytest.mark.parametrize("n_q, n_k, q_chunk, kv_chunk, upcast", [(37, 53, 8, 16, False), (64, 64, 64, 64, False),
                                                                   (10, 300, 4, 7, True)])
def test_chunked_attention_equals_softmax_attention(n_q, n_k, q_chunk, kv_chunk, upcast):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) * 3 for n in (n_q, n_k, n_k))
    reference = torch.softmax(q @ k.transpose(-1, -2) * 0.35, dim=-1) @ v
    out = chunked_attention(q, k, v, scale=0.35, q_chunk=q_chunk, kv_chunk=kv_chunk, upcast=upcast)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_chunked_attention_is_stable_with_large_scores():
    q = torch.full((1, 1, 4, 2), 60.0)
    k = torch.full((1, 1, 9, 2), 60.0)
    v = torch.arange(18.0).view(1, 1, 9, 2)
    out = chunked_attention(q, k, v, scale=1.0, q_chunk=2, kv_chunk=2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, v.mean(dim=-2, keepdim=True).expand(1, 1, 4, 2))


def test_xformers_is_refused_on_a_cpu_and_falls_back_to_sdpa(pipe):
    with pytest.raises(UnavailableError, match="xformers runs on NVIDIA GPUs only.*use sdpa"):
        apply_all(pipe, [AttentionConfig(backend="xformers")], CTX)
    handles = apply_all(pipe, [AttentionConfig(backend="xformers")], CTX, strict=False)
    try:
        assert handles[0].info["notes"][0].startswith("attention.backend=xformers unavailable")
        assert {type(v).__name__ for v in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    finally:
        remove_all(handles)


@pytest.mark.parametrize("field, value", [("backend", "flash3"), ("query_chunk", 0), ("kv_chunk", -1),
                                          ("slice_size", 5000)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"AttentionConfig.{field}"):
        AttentionConfig(**{field: value})
