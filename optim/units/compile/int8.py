"""int8 for the OpenVINO backend through NNCF: weight-only compression, or full quantization calibrated on the
pipeline's own recorded inputs.

weights: every weight of a Convolution or MatMul stored as int8 with a per-channel scale; OpenVINO computes in
float after unpacking them, so it saves memory rather than time. full: the same weights plus int8 activations,
with ranges measured on the recorded calls; OpenVINO then runs those layers as int8 products (VNNI/AMX), the
speed path. Attention's softmax and the normalisations stay in float (NNCF's transformer preset).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

CALIBRATION_MAX = 16  # recorded calls used at most (evenly spaced over the run: every noise level is seen)


def _spread(samples: list, count: int) -> list:
    """`count` samples evenly spaced over the recorded ones, first and last included."""
    if len(samples) <= count:
        return samples
    return [samples[round(i * (len(samples) - 1) / (count - 1))] for i in range(count)]


def quantized_operations(model) -> int:
    """Operations that now run on int8 data: int8 weight constants and activation quantizers."""
    count = 0
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize" or (kind == "Constant" and op.get_element_type().get_type_name() in ("i8", "u8")):
            count += 1
    return count


def quantize(model, mode: str, calibration: list | None):
    """(the quantized OpenVINO model, how many operations were quantized). `calibration`: lists of input tensors,
    one list per recorded call (mode full only)."""
    import nncf

    if mode == "weights":
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    elif mode == "full":
        if not calibration:
            raise ValueError("int8 full needs recorded calls to calibrate on, and none were recorded")
        items = [[t.numpy() for t in sample] for sample in _spread(calibration, CALIBRATION_MAX)]
        model = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(items))
    else:
        raise ValueError(f"unknown int8 mode {mode!r}")
    count = quantized_operations(model)
    if not count:
        raise ValueError(f"NNCF quantized nothing (int8 {mode}) in this model")
    return model, count
