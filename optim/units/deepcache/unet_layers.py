"""The SD/SDXL UNet forward written layer by layer, so a step can run only part of it.

diffusers runs each down/up block as one call; feature caches (DeepCache) need to stop inside a
block and resume from a cached tensor. `UNetLayers` flattens the UNet into the skip-connection
layers of the original LDM layout (conv_in, every resnet+attention pair, every downsampler) and
their mirror-image up layers, running the very same modules in the very same order as
`UNet2DConditionModel.forward`, so with nothing cached the output is identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DownLayer:
    block: int
    index: int  # resnet/attention index inside the block, or -1 for the downsampler


@dataclass(frozen=True)
class UpLayer:
    block: int
    index: int
    last_in_block: bool


def _apply_freeu(block, h, res_h):
    """FreeU's backbone/skip re-weighting, exactly as diffusers' up blocks apply it (first two stages)."""
    if getattr(block, "s1", None) and getattr(block, "s2", None) and getattr(block, "b1", None) and \
            getattr(block, "b2", None):
        from diffusers.utils.torch_utils import apply_freeu

        return apply_freeu(block.resolution_idx, h, res_h, s1=block.s1, s2=block.s2, b1=block.b1, b2=block.b2)
    return h, res_h


class UNetLayers:
    """A UNet2DConditionModel seen as a list of down layers (each adds one skip) and up layers."""

    def __init__(self, unet):
        self.unet = unet
        self.down: list[DownLayer] = []
        for b, block in enumerate(unet.down_blocks):
            self.down.extend(DownLayer(b, i) for i in range(len(block.resnets)))
            if block.downsamplers is not None:
                self.down.append(DownLayer(b, -1))
        self.up: list[UpLayer] = []
        for b, block in enumerate(unet.up_blocks):
            n = len(block.resnets)
            self.up.extend(UpLayer(b, i, i == n - 1) for i in range(n))
        # skips: conv_in + one per down layer; each up layer consumes one, last first
        if len(self.up) != len(self.down) + 1:
            raise ValueError("unexpected UNet layout: up layers do not mirror the skip connections")

    @property
    def num_skips(self) -> int:
        return len(self.down) + 1

    # -- pieces
    def embed(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond=None):
        unet = self.unet
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, timestep_cond)
        class_emb = unet.get_class_embed(sample=sample, class_labels=None)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs or {})
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        ehs = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                 added_cond_kwargs=added_cond_kwargs or {})
        return emb, ehs

    def run_down(self, layer: DownLayer, h, emb, ehs):
        block = self.unet.down_blocks[layer.block]
        if layer.index < 0:
            for down in block.downsamplers:
                h = down(h)
            return h
        h = block.resnets[layer.index](h, emb)
        if getattr(block, "has_cross_attention", False):
            h = block.attentions[layer.index](h, encoder_hidden_states=ehs, cross_attention_kwargs=None,
                                              attention_mask=None, encoder_attention_mask=None,
                                              return_dict=False)[0]
        return h

    def run_mid(self, h, emb, ehs):
        mid = self.unet.mid_block
        if mid is None:
            return h
        if getattr(mid, "has_cross_attention", False):
            return mid(h, emb, encoder_hidden_states=ehs, attention_mask=None, cross_attention_kwargs=None,
                       encoder_attention_mask=None)
        return mid(h, emb)

    def run_up(self, layer: UpLayer, h, res_h, emb, ehs, upsample_size):
        block = self.unet.up_blocks[layer.block]
        h, res_h = _apply_freeu(block, h, res_h)
        h = torch.cat([h, res_h], dim=1)
        h = block.resnets[layer.index](h, emb)
        if getattr(block, "has_cross_attention", False):
            h = block.attentions[layer.index](h, encoder_hidden_states=ehs, cross_attention_kwargs=None,
                                              attention_mask=None, encoder_attention_mask=None,
                                              return_dict=False)[0]
        if layer.last_in_block and block.upsamplers is not None:
            for up in block.upsamplers:
                h = up(h, upsample_size)
        return h

    def head(self, h):
        unet = self.unet
        if unet.conv_norm_out is not None:
            h = unet.conv_norm_out(h)
            h = unet.conv_act(h)
        return unet.conv_out(h)

    def needs_upsample_size(self, sample) -> bool:
        factor = 2 ** len([b for b in self.unet.up_blocks if b.upsamplers is not None])
        return any(s % factor != 0 for s in sample.shape[-2:])

    # -- whole passes
    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, *, keep_from: int | None = None,
                resume: torch.Tensor | None = None, skips_needed: int | None = None):
        """Run the UNet. `keep_from=u` returns (output, hidden state entering up layer u);
        `resume` (with `skips_needed=k`) computes only the first k skips and the last k up layers."""
        emb, ehs = self.embed(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        forward_size = self.needs_upsample_size(sample)
        h = self.unet.conv_in(sample)
        skips = [h]
        limit = len(self.down) if resume is None else skips_needed - 1
        for layer in self.down[:limit]:
            h = self.run_down(layer, h, emb, ehs)
            skips.append(h)
        kept = None
        if resume is None:
            h = self.run_mid(h, emb, ehs)
            start = 0
        else:
            h = resume
            start = len(self.up) - skips_needed
        for u in range(start, len(self.up)):
            if keep_from is not None and u == keep_from:
                kept = h
            layer = self.up[u]
            res_h = skips.pop()
            upsample_size = skips[-1].shape[2:] if (forward_size and layer.last_in_block and skips) else None
            h = self.run_up(layer, h, res_h, emb, ehs, upsample_size)
        out = self.head(h)
        return out, kept
