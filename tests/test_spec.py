"""Specs are frozen data with validated fields and a JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
from sdaccel.optim.core.registry import all_units
from sdaccel.optim.spec.errors import ConfigError, ConflictError
from sdaccel.optim.spec.fields import describe
from sdaccel.optim.spec.model_ref import ModelRef
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.units.channels_last.unit import ChannelsLastConfig
from sdaccel.optim.units.precision.unit import PrecisionConfig


def test_specs_are_frozen_and_with_returns_a_new_one():
    spec = PipelineSpec.for_model("/models/a.safetensors")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.device = "cpu"
    other = spec.with_(device="cpu")
    assert other is not spec and other.device == "cpu" and spec.device == "auto"
    req = GenerationRequest(prompt="a cat", steps=20)
    changed = req.with_(steps=30)
    assert changed.steps == 30 and req.steps == 20
    ref = ModelRef(path="x.safetensors")
    assert ref.with_(family="sdxl-base").family == "sdxl-base" and ref.family == "auto"


def test_pipeline_spec_json_round_trip_keeps_every_optimization():
    spec = PipelineSpec(model=ModelRef(path="/m/x.safetensors", family="sd21-v", prediction_type="v_prediction"),
                        device="cpu", optimizations=(ChannelsLastConfig(vae=True),
                                                     PrecisionConfig(unet="bf16", allow_emulated=True)))
    text = spec.to_json()
    back = PipelineSpec.from_json(text)
    assert back == spec and hash(back) == hash(spec)
    assert json.loads(text)["optimizations"][0]["kind"] == "precision"


def test_generation_request_json_round_trip():
    req = GenerationRequest(prompt="长城, 清晨", negative_prompt="blurry", width=768, height=512, steps=12, cfg=5.5,
                            seed=2**63, batch_size=3, scheduler="euler_a", init_image="in.png", strength=0.4)
    assert GenerationRequest.from_json(req.to_json()) == req


def test_in_memory_init_image_refuses_json_with_a_fix():
    from PIL import Image

    req = GenerationRequest(prompt="x", init_image=Image.new("RGB", (8, 8)))
    with pytest.raises(ConfigError, match="init_image.*save the image to a file"):
        req.to_json()


def test_optimizations_are_kept_in_canonical_order_and_precision_is_always_present():
    spec = PipelineSpec.for_model("a.safetensors").with_optimization(ChannelsLastConfig())
    assert [c.kind for c in spec.optimizations] == ["precision", "channels_last"]
    order = list(all_units())
    assert order.index("precision") < order.index("channels_last")
    assert spec.without("channels_last").optimizations == (PrecisionConfig(),)


def test_with_optimization_replaces_the_same_kind():
    spec = PipelineSpec.for_model("a").with_optimization(ChannelsLastConfig(vae=False))
    spec = spec.with_optimization(ChannelsLastConfig(vae=True))
    assert [c for c in spec.optimizations if c.kind == "channels_last"] == [ChannelsLastConfig(vae=True)]


def test_two_configs_of_one_kind_are_rejected():
    with pytest.raises(ConflictError, match="set twice"):
        PipelineSpec(model=ModelRef(path="a"), optimizations=(ChannelsLastConfig(), ChannelsLastConfig(vae=True)))


@pytest.mark.parametrize("make, field", [
    (lambda: GenerationRequest(width=500), "GenerationRequest.width"),
    (lambda: GenerationRequest(steps=0), "GenerationRequest.steps"),
    (lambda: GenerationRequest(cfg=-1.0), "GenerationRequest.cfg"),
    (lambda: GenerationRequest(scheduler="plms"), "GenerationRequest.scheduler"),
    (lambda: GenerationRequest(strength=1.5), "GenerationRequest.strength"),
    (lambda: GenerationRequest(steps="many"), "GenerationRequest.steps"),
    (lambda: PrecisionConfig(unet="int8"), "PrecisionConfig.unet"),
    (lambda: ChannelsLastConfig(unet="yes"), "ChannelsLastConfig.unet"),
    (lambda: ModelRef(path="a", family="sd3"), "ModelRef.family"),
    (lambda: PipelineSpec.for_model("a").with_(device="tpu"), "PipelineSpec.device"),
    (lambda: GenerationRequest.from_dict({"promt": "typo"}), "GenerationRequest.promt"),
    (lambda: PipelineSpec.from_dict({"model": {"path": "a"}, "optimizations": [{"kind": "warp"}]}),
     "optimization"),
])
def test_bad_values_name_the_field(make, field):
    with pytest.raises(ConfigError) as err:
        make()
    assert field in str(err.value)


def test_multiple_of_eight_error_suggests_values():
    with pytest.raises(ConfigError, match="use 496 or 504"):
        GenerationRequest(height=500)


def test_every_ui_field_describes_itself_once():
    from sdaccel.optim.core.registry import all_units

    classes = [GenerationRequest, ModelRef, PipelineSpec] + [u.config_cls for u in all_units().values()]
    for cls in classes:
        infos = describe(cls)
        assert infos, cls
        for info in infos:
            assert info.tooltip and len(info.tooltip) > 10, (cls, info.name)
            if info.kind in (int, float) and info.ui and info.name != "seed":
                assert info.min is not None and info.max is not None, (cls, info.name)
            if info.choices:
                assert info.default in info.choices or info.default is None, (cls, info.name)


def test_int_fields_coerce_integral_floats_and_float_fields_accept_ints():
    req = GenerationRequest(steps=20.0, cfg=7)
    assert isinstance(req.steps, int) and isinstance(req.cfg, float)
