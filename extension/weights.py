"""Which weight an A1111/Forge convolution uses for this call, for the Winograd hooks (`cpukernels.adapter`).

A1111's built-in Lora extension replaces `torch.nn.Conv2d.forward` with one that first writes the selected
networks into the layer's weight (in place, once per selection, `networks.network_apply_weights`). The
Winograd hook replaces the layer's own forward, so it calls that same function first: the transformed filters
then follow the weight the host would have used (an in-place change is seen by the filter stamps). With
`lora_functional` on, the host adds the networks on the fly instead: the hook leaves such calls to the host.

Forge's convolutions (`backend.operations`, ComfyUI-derived) make their weight per call: its LoRAs are written
into the weights in place when the model is loaded with them, or added per call ("online" LoRAs, a scale for
fp8 weights), and manual-cast layers cast the weight to the input's dtype. The hook asks Forge's own
`get_weight_and_bias` for the first two and leaves manual-cast calls to Forge.
"""

from __future__ import annotations

import sys


def _forge_conv_weights(conv, x, operations):
    if getattr(conv, "parameters_manual_cast", False):
        return None
    return operations.get_weight_and_bias(conv)


def a1111_conv_weights(conv, x):
    operations = sys.modules.get("backend.operations")  # Forge
    if operations is not None and hasattr(conv, "parameters_manual_cast"):
        return _forge_conv_weights(conv, x, operations)
    networks = sys.modules.get("networks")
    if networks is not None and hasattr(networks, "network_apply_weights"):
        shared = sys.modules.get("modules.shared")
        if getattr(getattr(shared, "opts", None), "lora_functional", False):
            return None
        networks.network_apply_weights(conv)
    return conv.weight, conv.bias
