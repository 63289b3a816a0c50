"""Token merging (ToMe for SD): the matching's merge and unmerge, the blocks it touches, ratio 0 as the identity,
and bad settings. (Apply/remove symmetry in any order: the contract suite; its speed and fidelity: `bench
--preset tome`, in the README.)"""

from __future__ import annotations

import pytest
import torch
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec.errors import ConfigError
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.units.tome import ToMeConfig
from sdaccel.optim.units.tome.merge import grid_of, matching

REQUEST = GenerationRequest(prompt="a lighthouse", negative_prompt="blurry", width=64, height=64, steps=2, seed=3)


def test_merge_drops_r_tokens_and_unmerge_gives_every_token_back():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8 * 8, 16, generator=gen)
    merge, unmerge = matching(x, 8, 8, 2, 24)
    merged = merge(x)
    assert merged.shape == (2, 64 - 24, 16)
    back = unmerge(merged)
    assert back.shape == x.shape
    same = (back == x).all(dim=-1)  # the kept sources come back exactly; the merged ones take their destination's
    assert int(same.sum(dim=1).min()) >= 64 - 24 - 16  # (a destination that absorbed sources changes too)
    windows = torch.randn(1, 4 * 4, 8, generator=gen).reshape(1, 4, 4, 8)
    flat = windows.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(1, 64, 8)  # each 2x2 window one token
    merge, unmerge = matching(flat, 8, 8, 2, 48)
    assert torch.allclose(unmerge(merge(flat)), flat, atol=1e-6)  # identical tokens merge losslessly


def test_the_grid_of_a_block_and_the_depth_limit():
    assert grid_of(64 * 64, (64, 64), 1) == (64, 64)
    assert grid_of(32 * 32, (64, 64), 1) is None and grid_of(32 * 32, (64, 64), 2) == (32, 32)
    assert grid_of(13 * 9, (25, 17), 2) == (13, 9)  # odd latents: the UNet's own rounding up
    assert grid_of(77, (64, 64), 8) is None  # text tokens are no grid


def test_ratio_zero_is_the_plain_image_and_merging_changes_it_only_where_allowed(checkpoints, cache):
    spec = PipelineSpec(model=checkpoints.get("sd15"))
    plain = run(spec, REQUEST, cache=cache)
    zero = run(spec.with_optimization(ToMeConfig(ratio=0.0)), REQUEST, cache=cache)
    assert torch.equal(zero.images_tensor, plain.images_tensor)
    merged = run(spec.with_optimization(ToMeConfig(ratio=0.5)), REQUEST, cache=cache)
    assert not torch.equal(merged.images_tensor, plain.images_tensor)
    counts = cache.prepare(spec.with_optimization(ToMeConfig(ratio=0.5))).handle("tome").info["counts"]
    assert counts["merged_calls"] > 0
    deep = cache.prepare(spec.with_optimization(ToMeConfig(ratio=0.5, max_downsample=8))).handle("tome")
    run(spec.with_optimization(ToMeConfig(ratio=0.5, max_downsample=8)), REQUEST, cache=cache)
    assert deep.info["counts"]["merged_calls"] > counts["merged_calls"] / 2  # deeper blocks merge too
    again = run(spec, REQUEST, cache=cache)
    assert torch.equal(again.images_tensor, plain.images_tensor)  # removed: the plain image


def test_sdxl_merges_on_its_largest_attention_maps_by_default(checkpoints, cache):
    """SDXL's first level has no attention: the default (max_downsample 1) must still merge, one level down."""
    spec = PipelineSpec(model=checkpoints.get("sdxl-base"))
    plain = run(spec, REQUEST, cache=cache)
    merged = run(spec.with_optimization(ToMeConfig(ratio=0.5)), REQUEST, cache=cache)
    handle = cache.prepare(spec.with_optimization(ToMeConfig(ratio=0.5))).handle("tome")
    assert handle.info["max_downsample"] == 2
    assert handle.info["counts"]["merged_calls"] > 0
    assert not torch.equal(merged.images_tensor, plain.images_tensor)


@pytest.mark.parametrize("fields, match", [({"ratio": 0.9}, "ratio"), ({"max_downsample": 3}, "max_downsample"),
                                           ({"stride": 1}, "stride")])
def test_bad_settings_name_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        ToMeConfig(**fields)
