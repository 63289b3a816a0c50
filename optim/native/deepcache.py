"""DeepCache on a UNet in the LDM layout, from its module structure alone.

On a cached step the deep part (input blocks from `k = cache_branch_id + 2` on, the middle block and the output
blocks before `n - k`) returns an empty-channel view of its input instead of computing: the host's own forward
then concatenates nothing with nothing down there, and the first live output block receives just its skip, to
which the hidden state kept at the last full step is prepended. Everything the host does around the layers
(embeddings, its patches on the live layers, the upsample sizes) runs as usual, so the same code serves ComfyUI,
A1111 and Forge. With nothing cached (interval 1) every call is the host's own forward, unchanged.

The kept state is per call within a step (a host may run the conditional and unconditional halves as separate
calls) and per input shape; a batch that changes (guidance cut off) starts afresh with one full step.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..core.registry import RunContext
from ..spec.errors import ConfigError
from ..units.deepcache.config import DeepCacheConfig
from .ldm import block_layers, find_ldm_unet, mark_layer_patch


class _Kept:
    __slots__ = ("key", "hidden", "full_step")

    def __init__(self):
        self.key, self.hidden, self.full_step = None, None, -1


class LDMDeepCache:
    """DeepCache state for one LDM UNet: `install()` once per run, `call(step, sample)` around each UNet call."""

    def __init__(self, model, cfg: DeepCacheConfig):
        unet = find_ldm_unet(model, "SDAccel DeepCache")
        n = len(unet.input_blocks)
        k = cfg.cache_branch_id + 2
        if k > n - 1:
            raise ConfigError("cache_branch_id", f"{cfg.cache_branch_id} is beyond this UNet's {n} skip branches",
                              f"Use 0..{n - 3}")
        self.unet, self.cfg, self.k = unet, cfg, k
        self.skipped = [layer for block in unet.input_blocks[k:] for layer in block_layers(block)]
        self.skipped += block_layers(unet.middle_block)
        self.skipped += [layer for block in unet.output_blocks[:n - k] for layer in block_layers(block)]
        self.skip_source = block_layers(unet.input_blocks[k - 1])[-1]  # its output is the live skip's width
        self.boundary = block_layers(unet.output_blocks[n - k])[0]
        self.mode = "off"  # "full" | "cached" | "off" (a call caching must not touch)
        self.skip_channels = 0
        self.kept: dict[int, _Kept] = {}
        self.current: _Kept | None = None
        self._step, self._call = -1, 0
        self._installed: list = []

    # -- layer forwards
    def _skipped(self, original):
        def forward(x, *args, **kwargs):
            if self.mode == "cached":
                return x[:, :0]
            return original(x, *args, **kwargs)

        return forward

    def _source(self, original):
        def forward(x, *args, **kwargs):
            out = original(x, *args, **kwargs)
            self.skip_channels = out.shape[1]
            return out

        return forward

    def _boundary(self, original):
        def forward(x, *args, **kwargs):
            if self.mode == "full":
                self.current.hidden = x[:, :x.shape[1] - self.skip_channels].clone()
            elif self.mode == "cached":
                x = torch.cat([self.current.hidden, x], dim=1)
            return original(x, *args, **kwargs)

        return forward

    def install(self) -> None:
        wraps = [(layer, self._skipped) for layer in self.skipped]
        wraps += [(self.skip_source, self._source), (self.boundary, self._boundary)]
        for layer, make in wraps:
            previous = layer.__dict__.get("forward")
            layer.forward = make(previous or layer.forward)
            self._installed.append((layer, previous, layer.forward))
        mark_layer_patch(self.unet, "DeepCache", True)

    def uninstall(self) -> None:
        while self._installed:
            layer, previous, ours = self._installed.pop()
            if layer.__dict__.get("forward") is not ours:
                raise RuntimeError(f"another patch replaced the forward of {type(layer).__name__} inside the UNet "
                                   "after SDAccel's DeepCache; remove that patch first")
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
        mark_layer_patch(self.unet, "DeepCache", False)
        self.kept.clear()
        self._step, self._call, self.mode = -1, 0, "off"

    # -- per call
    def _wants_full(self, step: int, kept: _Kept, key) -> bool:
        cfg = self.cfg
        end = cfg.end_step or 10**9
        if kept.key != key or kept.hidden is None or step < cfg.start_step or step >= end:
            return True
        return (step - kept.full_step) % cfg.cache_interval == 0

    @contextmanager
    def call(self, step: int, sample: torch.Tensor, run: RunContext, *, bypass: str = ""):
        """Around one UNet call at `step`: a full call (keeping the deep state), a cached one, or, with `bypass`
        (the reason), the host's own call untouched."""
        if bypass:
            run.count("deepcache_bypassed_calls")
            run.note(f"DeepCache stepped aside: {bypass}")
            self.mode = "off"
            yield "off"
            return
        if step != self._step:
            self._step, self._call = step, 0
        else:
            self._call += 1
        kept = self.kept.setdefault(self._call, _Kept())
        key = (tuple(sample.shape), sample.dtype, sample.device)
        self.current = kept
        self.mode = "full" if self._wants_full(step, kept, key) else "cached"
        try:
            yield self.mode
        except BaseException:
            kept.key, kept.hidden = None, None
            raise
        finally:
            mode, self.mode, self.current = self.mode, "off", None
        if mode == "full":
            kept.key, kept.full_step = key, step
            run.count("deepcache_full_calls")
        else:
            run.count("deepcache_cached_calls")
