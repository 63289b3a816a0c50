"""DeepCache (Ma et al., 2023, arXiv 2312.00858): reuse the UNet's deep features between steps.

Adjacent denoising steps change the high-level features little. Every `cache_interval` steps the
whole UNet runs and the hidden state entering the up layer of skip branch `cache_branch_id` is kept;
the steps in between run only the shallow branch (conv_in, the first few down layers, the mirrored
up layers) and resume from the kept state. Lossy: measured, not assumed.

SDAccel's version is keyed per run and per shape, so a size, dtype or batch change starts afresh,
and it combines with the CFG cutoff: when guidance stops and the batch halves, the kept state keeps
its conditional half instead of crashing (the DeepCache package keeps batch 2 there).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ...core.registry import ApplyContext, RunContext, Unit, register
from ...spec.errors import ConfigError
from .config import DeepCacheConfig
from .unet_layers import UNetLayers


class _CacheState:
    """What one pipeline's DeepCache remembers during one run."""

    def __init__(self, layers: UNetLayers, cfg: DeepCacheConfig):
        self.layers = layers
        self.cfg = cfg
        self.run: RunContext | None = None
        self.kept: torch.Tensor | None = None
        self.key = None
        self.last_full = -1
        self.skips_needed = cfg.cache_branch_id + 2
        self.keep_from = len(layers.up) - self.skips_needed

    def reset(self) -> None:
        self.kept, self.key, self.last_full = None, None, -1

    def _usable(self, sample: torch.Tensor) -> bool:
        """Whether the kept state fits this call; adapts it to a halved (post-CFG-cutoff) batch."""
        if self.kept is None:
            return False
        key = (tuple(sample.shape[1:]), sample.dtype, sample.device)
        if key != self.key:
            return False
        batch, kept_batch = sample.shape[0], self.kept.shape[0]
        if batch == kept_batch:
            return True
        if kept_batch == 2 * batch:  # guidance stopped: [uncond, cond] -> cond
            self.kept = self.kept[batch:]
            return True
        return False

    def wants_full(self, step: int) -> bool:
        cfg = self.cfg
        end = cfg.end_step or 10**9
        if step < cfg.start_step or step >= end or self.last_full < 0:
            return True
        return (step - self.last_full) % cfg.cache_interval == 0


def _make_forward(original, state: _CacheState):
    def forward(sample, timestep, encoder_hidden_states=None, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict=True):
        extras = (class_labels, timestep_cond, attention_mask, cross_attention_kwargs, down_block_additional_residuals,
                  mid_block_additional_residual, down_intrablock_additional_residuals, encoder_attention_mask)
        run = state.run
        if run is None or any(e is not None for e in extras):  # outside a run, or inputs caching cannot honour
            return original(sample, timestep, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                            timestep_cond=timestep_cond, attention_mask=attention_mask,
                            cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                            down_block_additional_residuals=down_block_additional_residuals,
                            mid_block_additional_residual=mid_block_additional_residual,
                            down_intrablock_additional_residuals=down_intrablock_additional_residuals,
                            encoder_attention_mask=encoder_attention_mask, return_dict=return_dict)
        layers = state.layers
        if not state.wants_full(run.step) and state._usable(sample):
            out, _ = layers.forward(sample, timestep, encoder_hidden_states, added_cond_kwargs, resume=state.kept,
                                    skips_needed=state.skips_needed)
            run.count("deepcache_cached_steps")
            skipped = (len(layers.down) - (state.skips_needed - 1)) + 1 + (len(layers.up) - state.skips_needed)
            run.count("deepcache_skipped_layers", skipped)
        else:
            out, state.kept = layers.forward(sample, timestep, encoder_hidden_states, added_cond_kwargs,
                                             keep_from=state.keep_from)
            state.key = (tuple(sample.shape[1:]), sample.dtype, sample.device)
            state.last_full = run.step
            run.count("deepcache_full_steps")
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    return forward


@register
class DeepCache(Unit):
    config_cls = DeepCacheConfig

    def examples(self) -> list[DeepCacheConfig]:
        return [DeepCacheConfig(cache_interval=3, cache_branch_id=0), DeepCacheConfig(cache_interval=2,
                                                                                      cache_branch_id=3,
                                                                                      start_step=1, end_step=5)]

    def _apply(self, pipe, cfg: DeepCacheConfig, ctx: ApplyContext, patch) -> None:
        unet = pipe.unet
        layers = UNetLayers(unet)
        limit = layers.num_skips - 2
        if cfg.cache_branch_id > limit:
            raise ConfigError("DeepCacheConfig.cache_branch_id", f"{cfg.cache_branch_id} is beyond this UNet's "
                              f"{layers.num_skips} skip branches", f"use 0..{limit}")
        state = _CacheState(layers, cfg)
        patch.set_attr(unet, "forward", _make_forward(unet.forward, state))
        patch.info["state"] = state

    def run_scope(self, cfg: DeepCacheConfig, handle, run: RunContext):
        state: _CacheState = handle.info["state"]

        @contextmanager
        def scope():
            state.reset()
            state.run = run
            try:
                yield
            finally:
                full = run.counters.get("deepcache_full_steps", 0)
                cached = run.counters.get("deepcache_cached_steps", 0)
                if full or cached:
                    run.note(f"DeepCache: {cached} of {full + cached} UNet steps reused cached features "
                             f"(interval {cfg.cache_interval}, branch {cfg.cache_branch_id})")
                state.run = None
                state.reset()

        return scope()
