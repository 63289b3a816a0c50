"""DeepCache on an LDM UNet combined with the CFG cutoff, host-free: calls as the ComfyUI patches make them.

Before the cutoff the host runs the conditional and unconditional halves as one batch-2 call per step; after it
(SDAccel CFG Cutoff's `calc_cond_batch`) the conditional half alone, batch 1. DeepCache must keep reusing steps
on both sides: the new batch starts afresh with one full step, then caches again from that state. The real host
runs the same pair in test_comfy_model_patches.py.
"""

from __future__ import annotations

import torch
from test_native_compile import TinyLDMUnet, context, inputs

from sdaccel.optim.native.deepcache import LDMDeepCache
from sdaccel.optim.run.guidance import guided_steps
from sdaccel.optim.units.deepcache.config import DeepCacheConfig


def test_deepcache_keeps_reusing_steps_after_the_cfg_cutoff_drops_the_unconditional_half():
    torch.manual_seed(0)
    unet = TinyLDMUnet().eval()
    steps = 8
    guided = guided_steps(steps, 7.0, cutoff=0.5)
    x, t, ctx = inputs()  # batch 2: the conditional and unconditional halves of one step
    cache = LDMDeepCache(unet, DeepCacheConfig(cache_interval=2, cache_branch_id=0))
    run = context()
    modes, outs = [], []
    cache.install()
    try:
        with torch.no_grad():
            for step in range(steps):
                n = 2 if step < guided else 1  # after the cutoff: the conditional half only
                with cache.call(step, x[:n], run) as mode:
                    outs.append(unet(x[:n], t[:n], ctx[:n]))
                modes.append(mode)
            full = unet(x[:1], t[:1], ctx[:1])  # outside `cache.call` the installed layers run whole
    finally:
        cache.uninstall()
    assert guided == 4 and [out.shape[0] for out in outs] == [2] * 4 + [1] * 4  # no unconditional pass after
    assert modes == ["full", "cached"] * 4, modes  # reused before the cutoff, and again after it
    assert run.counters == {"deepcache_full_calls": 4, "deepcache_cached_calls": 4}
    # the same inputs every step: a cached call reproduces its full call from the state kept for its own batch
    for step in (1, 3):
        torch.testing.assert_close(outs[step], outs[step - 1], rtol=0, atol=1e-6)
    for step in (5, 7):
        torch.testing.assert_close(outs[step], outs[4], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[4], full, rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(unet(x[:1], t[:1], ctx[:1]), full)  # uninstalled: the plain forward
