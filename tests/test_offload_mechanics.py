"""lowvram's device swap, beyond its refusal on a CPU: which weights sit where during a UNet forward.

On a CPU-only machine the unit refuses lowvram (nothing to move), so these tests drive its mechanics with
the CPU as the target device: each visit makes a distinct copy (`.to(copy=True)`), so a block whose tensors
are not their home storage is the one "on the device". A GPU run does the same with real transfers.
"""

from __future__ import annotations

import pytest
import torch
from sdaccel.optim.core.patching import PatchSet
from sdaccel.optim.testing.random_weights import build_pipeline
from sdaccel.optim.units.offload.stores import DeviceSwap
from sdaccel.optim.units.offload.unit import _enable_lowvram

CPU = torch.device("cpu")


def _pointers(module) -> dict:
    return {name: t.data_ptr() for name, t in list(module.named_parameters()) + list(module.named_buffers())}


def _unet_inputs(unet, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([500]), context


@pytest.fixture
def pipe():
    return build_pipeline("sd15", tiny=True, seed=3)


def test_device_swap_visits_with_a_copy_and_puts_back_the_very_tensors(pipe):
    block = pipe.unet.down_blocks[0]
    home = _pointers(block)
    params = list(block.parameters())
    swap = DeviceSwap(block, CPU)
    swap.onload()
    visiting = _pointers(block)
    assert swap.resident and all(visiting[k] != home[k] for k in home)
    swap.onload()  # idempotent: no second copy
    assert _pointers(block) == visiting
    swap.offload()
    assert not swap.resident and _pointers(block) == home
    assert list(block.parameters()) == params  # the same Parameter objects, only their data swapped
    swap.onload()
    swap.close()
    assert _pointers(block) == home


def test_lowvram_keeps_one_unet_block_on_the_device_at_a_time_and_changes_no_output(pipe):
    unet = pipe.unet
    blocks = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    sample, t, context = _unet_inputs(unet)
    with torch.no_grad():
        expected = unet(sample, t, encoder_hidden_states=context).sample
    home = {i: _pointers(b) for i, b in enumerate(blocks)}
    rest_home = unet.conv_in.weight.data_ptr()

    patch = PatchSet("offload")
    _enable_lowvram(pipe, CPU, patch)
    visits = []

    def watch(index):
        def hook(module, args):  # registered after the unit's own pre-hook, so it sees the block loaded
            on_device = [i for i, b in enumerate(blocks) if _pointers(b) != home[i]]
            visits.append((index, on_device))
        return hook

    watchers = [b.register_forward_pre_hook(watch(i)) for i, b in enumerate(blocks)]
    try:
        assert unet.conv_in.weight.data_ptr() != rest_home  # the small layers moved for the whole run
        with torch.no_grad():
            got = unet(sample, t, encoder_hidden_states=context).sample
    finally:
        for w in watchers:
            w.remove()
    assert [i for i, _ in visits] == list(range(len(blocks)))
    assert all(on_device == [i] for i, on_device in visits), visits
    assert all(_pointers(b) == home[i] for i, b in enumerate(blocks))  # each went back after its forward
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    stager = patch.info["stager"]
    vae_home = _pointers(pipe.vae)
    stager.listener("start", "decode")
    assert _pointers(pipe.vae) != vae_home and stager.stores["vae"].resident
    stager.listener("end", "decode")
    assert _pointers(pipe.vae) == vae_home

    patch.remove()
    assert unet.conv_in.weight.data_ptr() == rest_home
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)
    with torch.no_grad():
        torch.testing.assert_close(unet(sample, t, encoder_hidden_states=context).sample, expected, rtol=0, atol=0)
