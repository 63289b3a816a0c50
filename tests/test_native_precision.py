"""The precision/layout patch's engine half (optim/native/precision.py), host-free: which dtype a choice means on
which CPU, and a run-scoped conversion that puts every tensor back by identity, even after an error."""

from __future__ import annotations

import pytest
import torch
from sdaccel.optim.core.registry import RunContext
from sdaccel.optim.native import precision
from sdaccel.optim.spec.errors import UnavailableError


def _run() -> RunContext:
    return RunContext(pipe=None, family=None, device="cpu", steps=1, batch=1, cfg_steps=1)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8),
                               torch.nn.Conv2d(8, 4, 3, padding=1)).eval()


@pytest.mark.parametrize("native", [True, False])
def test_half_means_bf16_only_where_the_cpu_has_it_and_an_emulated_choice_is_refused(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native", lambda name: native)
    dtype, note = precision.resolve_dtype("half", "cpu")
    assert (dtype, bool(note)) == ((torch.bfloat16, False) if native else (torch.float32, True))
    assert precision.resolve_dtype("half", "cuda") == (torch.float16, "")
    assert precision.resolve_dtype("fp32", "cpu") == (torch.float32, "")
    if native:
        assert precision.resolve_dtype("bf16", "cpu") == (torch.bfloat16, "")
    else:
        with pytest.raises(UnavailableError, match="emulated") as err:
            precision.resolve_dtype("bf16", "cpu")
        assert "dtype" in str(err.value) and "choose half" in str(err.value)
    with pytest.raises(UnavailableError, match="dtype"):
        precision.resolve_dtype("fp8", "cpu")


@pytest.mark.parametrize("dtype,channels_last", [(torch.bfloat16, False), (torch.float32, True),
                                                 (torch.bfloat16, True)])
def test_the_conversion_lasts_for_the_block_and_puts_every_tensor_back_by_identity(dtype, channels_last):
    net = _net()
    originals = {name: (p, p.data, p.data.clone()) for name, p in net.named_parameters()}
    x = torch.randn(1, 4, 12, 12)
    with torch.inference_mode():
        ref = net(x)
    run = _run()
    with precision.converted(net, run, dtype=dtype, channels_last=channels_last):
        assert all(p.dtype == dtype for p in net.parameters())
        assert all(p.is_contiguous(memory_format=torch.channels_last) == channels_last
                   for p in net.parameters() if p.dim() == 4)
        with torch.inference_mode():
            out = net(x.to(dtype)).float()
    assert run.counters["precision_channels_last_weights"] == (2 if channels_last else 0)
    if dtype == torch.bfloat16:
        assert run.counters["precision_weight_bytes"] * 2 == run.counters["precision_weight_bytes_before"]
        assert 1e-4 < float((out - ref).abs().max() / ref.abs().max()) < 5e-2  # bf16: changed, slightly
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # channels-last alone: lossless
    for name, p in net.named_parameters():
        param, data, copy = originals[name]
        assert p is param and p.dtype == torch.float32 and p.is_contiguous() and torch.equal(p.data, copy)
        if dtype == torch.bfloat16:  # narrowed: the very tensor it held before
            assert p.data.data_ptr() == data.data_ptr()


def test_an_error_inside_the_run_still_restores_the_model():
    net = _net()
    before = [p.data.clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with precision.converted(net, _run(), dtype=torch.bfloat16, channels_last=True):
            raise RuntimeError("boom")
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in net.parameters())
    assert all(torch.equal(p.data, b) for p, b in zip(net.parameters(), before))
