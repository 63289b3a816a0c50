"""The contract every registered optimization passes: exact removal, no double apply, conflicts refused.

New units join automatically: the suite parametrizes over the registry and each unit's examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from sdaccel.optim.errors import AlreadyAppliedError, ConflictError, UnavailableError
from sdaccel.optim.families import get_family
from sdaccel.optim.patching import installed
from sdaccel.optim.registry import (UNITS, ApplyContext, OptimizationConfig, Stage, Unit, all_units, apply_all,
                                    canonical_order, remove_all)
from sdaccel.optim.synthetic import build_pipeline

CASES = [(kind, i) for kind, unit in all_units().items() for i in range(len(unit.examples()))]


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("sd15", tiny=True, seed=3)


def _ctx(pipe):
    return ApplyContext(device=torch.device("cpu"), family=get_family("sd15"))


def _fingerprint(pipe):
    """Everything removal must restore: module tree, every tensor's dtype/device/strides/values, outputs."""
    modules = {}
    for name in ("unet", "vae", "text_encoder"):
        m = getattr(pipe, name)
        tensors = {k: (v.dtype, v.device, v.stride(), v.clone()) for k, v in
                   list(m.state_dict(keep_vars=True).items())}
        tree = [(n, type(s).__name__) for n, s in m.named_modules()]
        hooks = sum(len(s._forward_hooks) + len(s._forward_pre_hooks) for s in m.modules())
        # plain attributes too: a forward left behind as an instance attribute reads as "replaced" to others
        attrs = [(n, sorted(s.__dict__)) for n, s in m.named_modules()]
        modules[name] = (tensors, tree, hooks, type(m.forward), attrs)
    return modules


def _outputs(pipe):
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        sample = torch.randn(2, 4, 8, 8, generator=g)
        ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
        unet = pipe.unet(sample.to(pipe.unet.dtype), 500, encoder_hidden_states=ctx.to(pipe.unet.dtype)).sample
        image = pipe.vae.decode(sample.to(pipe.vae.dtype)).sample
        ids = pipe.tokenizer("a cat", return_tensors="pt").input_ids
        text = pipe.text_encoder(ids)[0]
    return unet.float(), image.float(), text.float()


def _assert_same(before, after):
    for name in before:
        tb, treeb, hooksb, fwdb, attrsb = before[name]
        ta, treea, hooksa, fwda, attrsa = after[name]
        assert treeb == treea, name
        assert hooksb == hooksa and fwdb == fwda, name
        assert attrsb == attrsa, (name, [(b, a) for b, a in zip(attrsb, attrsa) if b != a][:3])
        assert tb.keys() == ta.keys(), name
        for key in tb:
            db, devb, sb, vb = tb[key]
            da, deva, sa, va = ta[key]
            assert (db, devb, sb) == (da, deva, sa), (name, key)
            assert torch.equal(vb, va), (name, key)


@pytest.mark.parametrize("kind, index", CASES, ids=[f"{k}-{i}" for k, i in CASES])
def test_apply_then_remove_restores_everything_bit_for_bit(pipe, kind, index):
    unit = all_units()[kind]
    cfg = unit.examples()[index]
    before, outputs_before = _fingerprint(pipe), _outputs(pipe)
    handle = unit.apply(pipe, cfg, _ctx(pipe))
    assert kind in installed(pipe)
    changed = _fingerprint(pipe)
    assert any(before[n][0].keys() != changed[n][0].keys() or any(
        before[n][0][k][:3] != changed[n][0][k][:3] or not torch.equal(before[n][0][k][3], changed[n][0][k][3])
        for k in before[n][0]) for n in before) or handle.info, f"{kind} example {cfg} changed nothing"
    _outputs(pipe)  # runs while applied
    handle.remove()
    assert kind not in installed(pipe)
    _assert_same(before, _fingerprint(pipe))
    for a, b in zip(outputs_before, _outputs(pipe)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", list(all_units()))
def test_double_apply_is_rejected_and_changes_nothing(pipe, kind):
    unit = all_units()[kind]
    cfg = unit.examples()[0]
    handle = unit.apply(pipe, cfg, _ctx(pipe))
    try:
        state = _fingerprint(pipe)
        with pytest.raises(AlreadyAppliedError, match="already applied"):
            unit.apply(pipe, cfg, _ctx(pipe))
        _assert_same(state, _fingerprint(pipe))
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", list(all_units()))
def test_every_unit_states_its_order_and_has_examples(kind):
    unit = all_units()[kind]
    assert isinstance(unit.stage, Stage) and unit.title and unit.examples()
    assert all(isinstance(c, unit.config_cls) for c in unit.examples())


def test_declared_conflicts_are_rejected_before_anything_changes(pipe):
    units = all_units()
    pairs = [(a, b) for a, ua in units.items() for b in units if b in ua.conflicts]
    for a, b in pairs:
        before = _fingerprint(pipe)
        with pytest.raises(ConflictError) as err:
            apply_all(pipe, [units[a].examples()[0], units[b].examples()[0]], _ctx(pipe))
        assert a in str(err.value) and b in str(err.value)
        _assert_same(before, _fingerprint(pipe))


# -- the registry mechanism itself, with two throwaway units registered for this test only


@dataclass(frozen=True)
class _LeftConfig(OptimizationConfig):
    kind: ClassVar[str] = "test_left"


@dataclass(frozen=True)
class _RightConfig(OptimizationConfig):
    kind: ClassVar[str] = "test_right"


class _Left(Unit):
    kind, title, stage, config_cls = "test_left", "Left", Stage.COMPILE, _LeftConfig
    conflicts = {"test_right": "both rewrite the UNet forward; keep one of them"}

    def _apply(self, pipe, cfg, ctx, patch):
        patch.set_attr(pipe.unet, "sdaccel_marker", "left")


class _Right(Unit):
    kind, title, stage, config_cls = "test_right", "Right", Stage.ATTENTION, _RightConfig

    def _apply(self, pipe, cfg, ctx, patch):
        patch.set_attr(pipe.unet, "sdaccel_marker_right", "right")
        raise UnavailableError("test_right", "fails half-way on purpose")


@pytest.fixture
def throwaway_units(monkeypatch):
    all_units()
    monkeypatch.setitem(UNITS, "test_left", _Left())
    monkeypatch.setitem(UNITS, "test_right", _Right())


def test_conflict_message_names_both_and_the_fix(pipe, throwaway_units):
    before = _fingerprint(pipe)
    with pytest.raises(ConflictError) as err:
        apply_all(pipe, [_LeftConfig(), _RightConfig()], _ctx(pipe))
    message = str(err.value)
    assert "test_left" in message and "test_right" in message and "keep one of them" in message
    _assert_same(before, _fingerprint(pipe))
    assert not installed(pipe)


def test_canonical_order_ignores_wiring_order(throwaway_units):
    from sdaccel.optim.units.precision import PrecisionConfig

    ordered = canonical_order([_LeftConfig(), PrecisionConfig(), _RightConfig()])
    assert [c.kind for c in ordered] == ["precision", "test_right", "test_left"]


def test_a_failure_half_way_undoes_what_was_applied(pipe, throwaway_units):
    from sdaccel.optim.units.channels_last import ChannelsLastConfig

    before = _fingerprint(pipe)
    with pytest.raises(UnavailableError):
        apply_all(pipe, [ChannelsLastConfig(vae=True), _RightConfig()], _ctx(pipe))
    assert not hasattr(pipe.unet, "sdaccel_marker_right")
    assert not installed(pipe)
    _assert_same(before, _fingerprint(pipe))
    handles = apply_all(pipe, [ChannelsLastConfig(vae=True)], _ctx(pipe))  # the pipeline is still usable
    remove_all(handles)
    _assert_same(before, _fingerprint(pipe))


# -- the units' own promises


def test_channels_last_is_lossless(pipe):
    from sdaccel.optim.units.channels_last import ChannelsLastConfig

    ref = _outputs(pipe)
    handles = apply_all(pipe, [ChannelsLastConfig(unet=True, vae=True)], _ctx(pipe))
    try:
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        for a, b in zip(ref, _outputs(pipe)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    finally:
        remove_all(handles)


def test_precision_casts_each_component_and_measures_its_error(pipe):
    from sdaccel.optim.units.precision import PrecisionConfig

    ref = _outputs(pipe)
    handles = apply_all(pipe, [PrecisionConfig(unet="bf16", text_encoder="fp16", vae="fp32",
                                               allow_emulated=True)], _ctx(pipe))
    try:
        assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.float16
        assert pipe.vae.dtype == torch.float32
        unet, _, text = _outputs(pipe)
        rel = (unet - ref[0]).norm() / ref[0].norm()
        assert 0 < rel < 0.05, rel  # lossy by design, small: bf16 keeps ~3 significant digits
        assert (text - ref[2]).abs().max() < 0.05
    finally:
        remove_all(handles)


def test_precision_refuses_emulated_low_precision_on_a_cpu_without_it(monkeypatch, pipe):
    from sdaccel.optim.units import precision
    from sdaccel.optim.units.precision import PrecisionConfig

    monkeypatch.setattr(precision, "cpu_has_native", lambda name: False)
    before = _fingerprint(pipe)
    with pytest.raises(UnavailableError, match=r"precision.unet=bf16.*no native bf16.*use fp32"):
        apply_all(pipe, [PrecisionConfig(unet="bf16")], _ctx(pipe))
    _assert_same(before, _fingerprint(pipe))


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_half_precision_is_the_native_one(monkeypatch, pipe, native, expected):
    from sdaccel.optim.families import get_family
    from sdaccel.optim.registry import ApplyContext
    from sdaccel.optim.units import precision
    from sdaccel.optim.units.precision import PrecisionConfig, resolve_dtypes

    monkeypatch.setattr(precision, "cpu_has_native", lambda name: native and name == "bfloat16")
    cfg = PrecisionConfig(unet="half", text_encoder="half")
    gpu = resolve_dtypes(cfg, ApplyContext(device="cuda", family=get_family("sd15")))
    assert gpu["unet"] == gpu["text_encoder"] == torch.float16  # a GPU's half is fp16 (no GPU needed to resolve)
    handles = apply_all(pipe, [cfg], _ctx(pipe))
    try:
        assert pipe.unet.dtype == expected and pipe.text_encoder.dtype == expected
        assert pipe.vae.dtype == torch.float32  # vae stays on auto
    finally:
        remove_all(handles)
