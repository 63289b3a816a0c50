"""Token merging (ToMe for SD; Bolya & Hoffman 2023, arXiv 2303.17604): fewer tokens in self-attention.

Each transformer block's self-attention (`attn1`) is wrapped: the normed tokens it receives are merged
(`merge.matching`), attention runs on the rest, and its output is split back to every token before the block's
residual, as tomesd's default (attention only) does. Only blocks on the largest maps with attention are touched
by default, where attention costs most (SDXL's first level has none: its default merges one level down). The
latent's size comes from a hook on the UNet's input. Lossy (measured).
"""

from __future__ import annotations

from ...core.registry import ApplyContext, Unit, register
from .config import ToMeConfig
from .merge import grid_of, matching


def first_attention_downsample(unet) -> int:
    """How much the latent is downsampled at the UNet's first level with attention (1 for SD 1.x/2.x; 2 for SDXL,
    whose first level has none), so that "the largest maps" means the largest that attention runs on."""
    types = list(getattr(getattr(unet, "config", None), "down_block_types", None) or ())
    first = next((i for i, name in enumerate(types) if "Attn" in name), 0)
    return 2 ** first


def _wrap(attention, state: dict, cfg: ToMeConfig, counts: dict, max_downsample: int):
    host_forward = attention.forward

    def forward(hidden_states, *args, **kwargs):
        size = state.get("latent")
        grid = None
        if size is not None and hidden_states.dim() == 3 and kwargs.get("encoder_hidden_states") is None:
            grid = grid_of(hidden_states.shape[1], size, max_downsample)
        if grid is None:
            return host_forward(hidden_states, *args, **kwargs)
        r = int(hidden_states.shape[1] * cfg.ratio)
        merge, unmerge = matching(hidden_states, grid[0], grid[1], cfg.stride, r)
        counts["merged_calls"] = counts.get("merged_calls", 0) + 1
        return unmerge(host_forward(merge(hidden_states), *args, **kwargs))

    return forward


@register
class ToMe(Unit):
    config_cls = ToMeConfig

    def examples(self) -> list[ToMeConfig]:
        return [ToMeConfig(), ToMeConfig(ratio=0.3, max_downsample=2, stride=2)]

    def _apply(self, pipe, cfg: ToMeConfig, ctx: ApplyContext, patch) -> None:
        unet = pipe.unet
        state: dict = {}

        def remember_size(module, args, kwargs):
            sample = args[0] if args else kwargs.get("sample")
            state["latent"] = tuple(sample.shape[-2:])

        patch.add_hook(unet.register_forward_pre_hook(remember_size, with_kwargs=True))
        counts: dict = {}
        blocks = 0
        max_downsample = cfg.max_downsample * first_attention_downsample(unet)
        for module in unet.modules():
            attention = getattr(module, "attn1", None)
            if attention is not None and hasattr(module, "norm1"):
                patch.set_attr(attention, "forward", _wrap(attention, state, cfg, counts, max_downsample))
                blocks += 1
        patch.info["blocks"] = blocks
        patch.info["max_downsample"] = max_downsample
        patch.info["counts"] = counts
