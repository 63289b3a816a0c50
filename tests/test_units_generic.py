"""Checks every unit shares: bad values name their field; run-scoped effects end with the run."""

from __future__ import annotations

import pytest
import torch
from sdaccel.optim.core.registry import all_units
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec.errors import ConfigError
from sdaccel.optim.spec.fields import describe
from sdaccel.optim.spec.model_ref import ModelRef
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.units.precision.unit import PrecisionConfig, _tf32_scope


def _bad_values(info):
    if info.kind is bool:
        yield "yes"
    if info.choices:
        yield "no-such-choice"
    if info.kind in (int, float):
        if info.min is not None:
            yield info.min - 1
        if info.max is not None:
            yield info.max + 1
        yield "many"


CASES = [(kind, info.name, value) for kind, unit in all_units().items() for info in describe(unit.config_cls)
         for value in _bad_values(info)]


@pytest.mark.parametrize("kind, name, value", CASES, ids=[f"{k}.{n}={v}" for k, n, v in CASES])
def test_bad_values_are_refused_naming_the_field(kind, name, value):
    cls = all_units()[kind].config_cls
    with pytest.raises(ConfigError) as err:
        cls(**{name: value})
    assert f"{cls.__name__}.{name}" in str(err.value)


def test_every_unit_field_reaches_its_node_with_its_own_description():
    """The toggle node's inputs are the config's ui fields, in order, each with the field's tooltip and default."""
    from sdaccel.nodes import NODE_CLASS_MAPPINGS
    from sdaccel.nodes.toggles import node_id

    for unit in all_units().values():
        types = NODE_CLASS_MAPPINGS[node_id(unit.kind)].INPUT_TYPES()
        inputs = {**types["required"], **types.get("optional", {})}
        fields = [info for info in describe(unit.config_cls) if info.ui]
        assert list(inputs)[1:] == [info.name for info in fields], unit.kind
        for info in fields:
            # a field added after the node shipped is optional: prompts saved before it still validate
            assert (info.name in types.get("optional", {})) == info.late, (unit.kind, info.name)
            options = inputs[info.name][1]
            assert options["tooltip"].startswith(info.tooltip), (unit.kind, info.name)
            assert options.get("default", info.default) == info.default, (unit.kind, info.name)


def test_tf32_scope_restores_the_flags_even_when_the_run_fails():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with pytest.raises(RuntimeError):
        with _tf32_scope(not before[0], not before[1]):
            assert torch.backends.cuda.matmul.allow_tf32 == (not before[0])
            raise RuntimeError("boom")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_half_precision_vae_overflow_is_redecoded_in_fp32(cache, caplog):
    spec = PipelineSpec(model=ModelRef.synthetic("sd15", tiny=True), device="cpu")
    req = GenerationRequest(prompt="x", width=64, height=64, steps=1, seed=1)
    reference = run(spec, req, cache=cache)
    vae = cache.entries()[-1].pipe.vae
    with torch.no_grad():  # weights that overflow fp16's 65504 inside the decoder, but not fp32
        vae.decoder.conv_in.weight.mul_(4000.0)
        vae.decoder.conv_in.bias.mul_(4000.0)
    try:
        fp32 = run(spec, req, cache=cache)
        half = spec.with_optimization(PrecisionConfig(vae="fp16", allow_emulated=True))
        upcast = run(half, req, cache=cache)
        assert torch.isfinite(upcast.images_tensor).all()
        assert any("re-decoded in fp32" in n for n in upcast.stats.notes)
        assert upcast.stats.counters["vae_upcast_decodes"] == 1
        torch.testing.assert_close(upcast.images_tensor, fp32.images_tensor, rtol=0, atol=2e-2)
        off = run(half.with_optimization(PrecisionConfig(vae="fp16", allow_emulated=True, vae_auto_upcast=False)),
                  req, cache=cache)
        assert any("auto upcast is off" in n for n in off.stats.notes)
    finally:
        with torch.no_grad():
            vae.decoder.conv_in.weight.div_(4000.0)
            vae.decoder.conv_in.bias.div_(4000.0)
    assert reference.images_tensor.shape == (1, 64, 64, 3)
