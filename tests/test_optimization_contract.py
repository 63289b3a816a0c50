"""The contract every registered optimization passes: exact removal, no double apply, conflicts refused.

New units join automatically: the suite parametrizes over the registry and each unit's examples.
Removal must restore the pipeline whatever order handles are removed in, including every pair of
units applied together and removed first-applied first.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from sdaccel.optim.core import patching
from sdaccel.optim.core.patching import OutOfOrderRemovalError, PatchSet, installed, new_patchset
from sdaccel.optim.core.registry import UNITS, ApplyContext, RunContext, Unit, all_units, apply_all, remove_all
from sdaccel.optim.models.families import get_family
from sdaccel.optim.spec import optimization as spec_optimization
from sdaccel.optim.spec.errors import AlreadyAppliedError, ConflictError, UnavailableError
from sdaccel.optim.spec.optimization import OptimizationConfig, Stage, canonical_order, check_conflicts
from sdaccel.optim.testing.random_weights import build_pipeline

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
        # which objects the plain attributes hold (a forward, a processor, a flag), to see what changed
        held = {(n, k): id(v) for n, s in m.named_modules() for k, v in s.__dict__.items()
                if not k.startswith("_")}
        modules[name] = (tensors, tree, hooks, type(m.forward), attrs, held)
    return modules


def _changed(before, after) -> list[str]:
    """What differs between two fingerprints: tensors, the module tree, hooks or plain attributes."""
    out = []
    for n in before:
        tb, treeb, hooksb, fwdb, attrsb, heldb = before[n]
        ta, treea, hooksa, fwda, attrsa, helda = after[n]
        if tb.keys() != ta.keys() or any(tb[k][:3] != ta[k][:3] or not torch.equal(tb[k][3], ta[k][3]) for k in tb):
            out.append(f"{n} tensors")
        if (treeb, hooksb, fwdb, attrsb) != (treea, hooksa, fwda, attrsa) or heldb != helda:
            out.append(f"{n} modules")
    return out


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


def _assert_same(before, after, *, same_objects=True):
    """`same_objects`: the untouched pipeline's own forwards must be back (a re-applied unit makes new ones)."""
    for name in before:
        tb, treeb, hooksb, fwdb, attrsb, heldb = before[name]
        ta, treea, hooksa, fwda, attrsa, helda = after[name]
        if same_objects:
            forwards = {k: v for k, v in heldb.items() if k[1] == "forward"}
            assert forwards == {k: v for k, v in helda.items() if k[1] == "forward"}, name
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
    if not _changed(before, _fingerprint(pipe)):  # acts only while a run goes on (e.g. staged offload)
        run = RunContext(pipe=pipe, family=get_family("sd15"), device=torch.device("cpu"), steps=1, batch=1,
                         cfg_steps=1)
        assert unit.run_scope(cfg, handle, run) is not None, f"{kind} example {cfg} changed nothing"
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
    pairs = [(a, b) for a, ua in units.items() for b in units if b in ua.config_cls.conflicts]
    assert ("offload", "compile") in pairs
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
    stage: ClassVar[Stage] = Stage.COMPILE
    title: ClassVar[str] = "Left"
    conflicts: ClassVar[dict] = {"test_right": "both rewrite the UNet forward; keep one of them"}


@dataclass(frozen=True)
class _RightConfig(OptimizationConfig):
    kind: ClassVar[str] = "test_right"
    stage: ClassVar[Stage] = Stage.ATTENTION
    title: ClassVar[str] = "Right"


class _Left(Unit):
    config_cls = _LeftConfig

    def _apply(self, pipe, cfg, ctx, patch):
        patch.set_attr(pipe.unet, "sdaccel_marker", "left")


class _Right(Unit):
    config_cls = _RightConfig

    def _apply(self, pipe, cfg, ctx, patch):
        patch.set_attr(pipe.unet, "sdaccel_marker_right", "right")
        raise UnavailableError("test_right", "fails half-way on purpose")


@pytest.fixture
def throwaway_units(monkeypatch):
    all_units()
    for cfg_cls, unit in ((_LeftConfig, _Left()), (_RightConfig, _Right())):
        monkeypatch.setitem(spec_optimization._CONFIGS, cfg_cls.kind, cfg_cls)
        monkeypatch.setitem(UNITS, cfg_cls.kind, unit)


def test_units_take_kind_title_and_stage_from_their_config():
    assert (_Left.kind, _Left.title, _Left.stage) == ("test_left", "Left", Stage.COMPILE)
    for kind, unit in all_units().items():
        assert (unit.kind, unit.title, unit.stage, unit.lossless) == (
            kind, unit.config_cls.title, unit.config_cls.stage, unit.config_cls.lossless)


def test_conflict_message_names_both_and_the_fix(pipe, throwaway_units):
    before = _fingerprint(pipe)
    with pytest.raises(ConflictError) as err:
        apply_all(pipe, [_LeftConfig(), _RightConfig()], _ctx(pipe))
    message = str(err.value)
    assert "test_left" in message and "test_right" in message and "keep one of them" in message
    _assert_same(before, _fingerprint(pipe))
    assert not installed(pipe)


def test_canonical_order_ignores_wiring_order(throwaway_units):
    from sdaccel.optim.units.precision.unit import PrecisionConfig

    ordered = canonical_order([_LeftConfig(), PrecisionConfig(), _RightConfig()])
    assert [c.kind for c in ordered] == ["precision", "test_right", "test_left"]


def test_a_failure_half_way_undoes_what_was_applied(pipe, throwaway_units):
    from sdaccel.optim.units.channels_last.unit import ChannelsLastConfig

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
    from sdaccel.optim.units.channels_last.unit import ChannelsLastConfig

    ref = _outputs(pipe)
    handles = apply_all(pipe, [ChannelsLastConfig(unet=True, vae=True)], _ctx(pipe))
    try:
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        for a, b in zip(ref, _outputs(pipe)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    finally:
        remove_all(handles)


def test_precision_casts_each_component_and_measures_its_error(pipe):
    from sdaccel.optim.units.precision.unit import PrecisionConfig

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
    from sdaccel.optim.units.precision import unit as precision
    from sdaccel.optim.units.precision.unit import PrecisionConfig

    monkeypatch.setattr(precision, "cpu_has_native", lambda name: False)
    before = _fingerprint(pipe)
    with pytest.raises(UnavailableError, match=r"precision.unet=bf16.*no native bf16.*use fp32"):
        apply_all(pipe, [PrecisionConfig(unet="bf16")], _ctx(pipe))
    _assert_same(before, _fingerprint(pipe))


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_half_precision_is_the_native_one(monkeypatch, pipe, native, expected):
    from sdaccel.optim.core.registry import ApplyContext
    from sdaccel.optim.models.families import get_family
    from sdaccel.optim.units.precision import unit as precision
    from sdaccel.optim.units.precision.unit import PrecisionConfig, resolve_dtypes

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


# -- removal in any order


def _pairs():
    units = all_units()
    out = []
    kinds = list(units)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            cfg_a, cfg_b = units[a].examples()[0], units[b].examples()[0]
            try:
                check_conflicts([cfg_a, cfg_b])
            except ConflictError:
                continue
            out.append((a, b))
    return out


PAIRS = _pairs()


@pytest.mark.parametrize("first_out", ["first_applied", "last_applied"])
@pytest.mark.parametrize("a, b", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_every_pair_removes_in_either_order(pipe, a, b, first_out):
    """Apply two units, remove them one at a time in either order: each step leaves the other one intact and
    the end state is the untouched pipeline (module tree, attributes, tensors and outputs)."""
    units = all_units()
    before, outputs_before = _fingerprint(pipe), _outputs(pipe)
    handles = None
    for cfg_a, cfg_b in itertools.product(units[a].examples(), units[b].examples()):
        try:  # the first pair of examples this machine can run together (OpenVINO refuses a bf16 UNet)
            handles = apply_all(pipe, [cfg_a, cfg_b], _ctx(pipe))
            break
        except UnavailableError:
            _assert_same(before, _fingerprint(pipe))
    assert handles is not None, f"no examples of {a} and {b} combine here"
    configs = {h.name: h.info["config"] for h in handles}
    remove_all(handles)
    alone = {}
    for kind in (a, b):  # the state with only `kind` applied, to compare after the other one goes
        handle = units[kind].apply(pipe, configs[kind], _ctx(pipe))
        alone[kind] = _fingerprint(pipe)
        handle.remove()
    handles = apply_all(pipe, list(configs.values()), _ctx(pipe))
    order = handles if first_out == "first_applied" else list(reversed(handles))
    order[0].remove()
    kept = order[1].name
    assert list(installed(pipe)) == [kept]
    _assert_same(alone[kept], _fingerprint(pipe), same_objects=False)
    order[1].remove()
    assert not installed(pipe)
    _assert_same(before, _fingerprint(pipe))
    for x, y in zip(outputs_before, _outputs(pipe)):
        assert torch.equal(x, y)


def test_deepcache_then_compile_removed_out_of_order_relinks_the_forward(pipe):
    """The case that broke: both replace unet.forward; removing DeepCache first must keep compile working."""
    units = all_units()
    original = pipe.unet.__dict__.get("forward")
    deepcache = units["deepcache"].apply(pipe, units["deepcache"].examples()[0], _ctx(pipe))
    compiled = units["compile"].apply(pipe, units["compile"].config_cls(backend="inductor"), _ctx(pipe))
    deepcache.remove()
    assert list(installed(pipe)) == ["compile"] and compiled.info["targets"]
    assert pipe.unet.__dict__.get("forward") is not None  # compile's wrapper, over the plain forward
    compiled.remove()
    assert pipe.unet.__dict__.get("forward") is original


def _marker_set(pipe, name, value, *, reapply=True):
    patch = new_patchset(pipe, name)
    patch.set_attr(pipe.unet, "sdaccel_marker", value)
    if reapply:
        patch.reapply = lambda: patch.set_attr(pipe.unet, "sdaccel_marker", value)
    return patch


def test_out_of_order_removal_replays_the_later_sets_on_the_same_attribute(pipe):
    first = _marker_set(pipe, "first", "one")
    second = _marker_set(pipe, "second", "two")
    first.remove()
    assert pipe.unet.sdaccel_marker == "two" and list(installed(pipe)) == ["second"]
    second.remove()
    assert not hasattr(pipe.unet, "sdaccel_marker") and not installed(pipe)


def test_out_of_order_removal_is_refused_when_a_later_set_cannot_be_replayed(pipe):
    first = _marker_set(pipe, "first", "one")
    second = _marker_set(pipe, "second", "two", reapply=False)
    with pytest.raises(OutOfOrderRemovalError, match="remove second first"):
        first.remove()
    assert pipe.unet.sdaccel_marker == "two" and list(installed(pipe)) == ["first", "second"]  # nothing changed
    second.remove()
    first.remove()
    assert not hasattr(pipe.unet, "sdaccel_marker")


def test_remove_runs_every_undo_and_reports_all_failures(pipe):
    patch = new_patchset(pipe, "failing")
    ran = []
    patch.on_remove(lambda: ran.append("first"))
    patch.on_remove(lambda: (_ for _ in ()).throw(ValueError("undo one broke")))
    patch.on_remove(lambda: ran.append("middle"))
    patch.on_remove(lambda: (_ for _ in ()).throw(KeyError("undo two broke")))
    with pytest.raises(RuntimeError, match=r"failed to restore 2 change\(s\).*undo two broke.*undo one broke"):
        patch.remove()
    assert ran == ["middle", "first"]  # newest first, and the failures did not stop the rest
    assert patch.removed and "failing" not in installed(pipe)


def test_a_replay_that_fails_is_reported_and_leaves_that_set_removed(pipe):
    first = _marker_set(pipe, "first", "one")
    second = _marker_set(pipe, "second", "two")

    def broken():
        raise OSError("weights file vanished")

    second.reapply = broken
    with pytest.raises(RuntimeError, match="weights file vanished"):
        first.remove()
    assert not installed(pipe) and second.removed and not hasattr(pipe.unet, "sdaccel_marker")


def test_patchsets_without_an_owner_remove_alone():
    obj = type("Obj", (), {})()
    patch = PatchSet("loose")
    patch.set_attr(obj, "x", 1)
    patch.remove()
    assert not hasattr(obj, "x") and patching.installed(obj) == {}
