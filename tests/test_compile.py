"""Compile backends: equivalence with eager, compile counting, stale-weight protection, exact removal.

Tolerance: compiled vs eager UNet/VAE outputs agree to atol = rtol = 1e-4 (measured max |diff| 2e-6..7e-6
on outputs of magnitude ~2 for OpenVINO f32 and inductor, fp32 on a CPU). Most inductor checks run on a
two-block "micro" UNet (cold C++ compile ~1 minute on 2 cores, ~20 s warm); the tiny family UNets take
2-3 minutes cold under inductor, so those tests are marked slow. OpenVINO converts the tiny UNets in ~10 s.
"""

from __future__ import annotations

import gc
import sys
import types
import weakref

import pytest
import torch
from sdaccel.optim.core.patching import PatchSet, installed
from sdaccel.optim.core.registry import (
    ApplyContext,
    RunContext,
    all_units,
    check_conflicts,
    get_unit,
    resolve_available,
)
from sdaccel.optim.models.families import get_family
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec.errors import ConfigError, ConflictError, UnavailableError
from sdaccel.optim.spec.model_ref import ModelRef
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.testing.random_weights import build_pipeline
from sdaccel.optim.units.compile import unit as compile_unit
from sdaccel.optim.units.compile.unit import CompileConfig, StaleCompileError, WeightWatch, compile_stats

TOL = {"atol": 1e-4, "rtol": 1e-4}
HAS_OPENVINO = compile_unit.package_available("openvino")
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed (pip install openvino)")
needs_cxx = pytest.mark.skipif(compile_unit._cxx_compiler() is None, reason="inductor needs a C++ compiler on a CPU")


@pytest.fixture(autouse=True)
def _isolate_dynamo():
    """Compiled graphs and dynamo's process-wide caches must not leak from one test into the next."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


def _ctx(family: str = "sd15", device: str = "cpu") -> ApplyContext:
    return ApplyContext(device=torch.device(device), family=get_family(family))


def _apply(pipe, cfg: CompileConfig, family: str = "sd15"):
    return get_unit("compile").apply(pipe, cfg, _ctx(family))


def _micro_unet(seed: int = 0):
    """A two-block UNet2DConditionModel (cross-attention, resampling, skips): cheap to compile."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=32,
                                    attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return unet.eval()


def _micro_pipe(seed: int = 0):
    """A pipeline stand-in holding only what the compile unit touches (a real UNet)."""
    return types.SimpleNamespace(unet=_micro_unet(seed))


def _inputs(unet, batch: int, height: int, width: int, seed: int = 0, xl: bool = False) -> dict:
    """UNet call arguments made in inference mode, as the sampler makes them."""
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        kwargs = {"sample": torch.randn(batch, 4, height, width, generator=g),
                  "timestep": torch.tensor(999.0 * torch.rand(1, generator=g).item()),
                  "encoder_hidden_states": torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)}
        if xl:
            pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                           "time_ids": torch.tensor([[height * 8.0, width * 8.0, 0, 0, 64, 64]] *
                                                                    batch)}
    return kwargs


def _eager(unet, kwargs) -> torch.Tensor:
    """The class forward, bypassing whatever the compile unit installed on the instance."""
    with torch.inference_mode():
        return type(unet).forward(unet, return_dict=False, **kwargs)[0]


def _compiled(unet, kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return unet(return_dict=False, **kwargs)[0]


def _totals(handle) -> dict:
    stats = compile_stats(handle).values()
    return {"graphs": sum(s.graphs for s in stats), "rebuilds": sum(s.rebuilds for s in stats),
            "eager_calls": sum(s.eager_calls for s in stats), "compile_s": sum(s.compile_s for s in stats)}


def _nudge_weights(unet, amount: float = 0.05) -> torch.Tensor:
    """A LoRA-style in-place merge through `.data` (bumps no version counter); returns the delta to undo it."""
    weight = unet.conv_in.weight
    delta = torch.full_like(weight, amount)
    weight.data.add_(delta)
    return delta


@pytest.fixture(scope="module")
def sd15():
    return build_pipeline("sd15", tiny=True, seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return build_pipeline("sdxl-base", tiny=True, seed=0)


# ---------------------------------------------------------------- configuration and availability


@pytest.mark.parametrize("fields, field", [
    ({"backend": "tvm"}, "CompileConfig.backend"),
    ({"mode": "fastest"}, "CompileConfig.mode"),
    ({"backend": "openvino", "mode": "max-autotune"}, "CompileConfig.mode"),
    ({"backend": "openvino", "freezing": True}, "CompileConfig.freezing"),
    ({"backend": "openvino", "granularity": "blocks"}, "CompileConfig.granularity"),
    ({"backend": "inductor", "openvino_precision": "auto"}, "CompileConfig.openvino_precision"),
    ({"dynamic": "yes"}, "CompileConfig.dynamic"),
    ({"targets": "vae"}, "CompileConfig.targets"),
])
def test_bad_values_name_the_field(fields, field):
    with pytest.raises(ConfigError) as err:
        CompileConfig(**fields)
    assert err.value.field == field and field in str(err.value)


def test_config_round_trips_and_rejects_unknown_fields():
    cfg = CompileConfig(backend="inductor", freezing=True, dynamic=True, targets="unet+vae")
    assert CompileConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="CompileConfig.fullgraph"):
        CompileConfig.from_dict({"fullgraph": True})


@pytest.mark.parametrize("backend, package", [("stable_fast", "stable-fast"), ("onediff", "onediff"),
                                              ("tensorrt", "torch-tensorrt")])
def test_cuda_only_backends_are_unavailable_with_the_reason_and_the_fix(backend, package):
    unit = get_unit("compile")
    with pytest.raises(UnavailableError) as err:
        unit.check(CompileConfig(backend=backend), _ctx())
    assert err.value.option == f"compile.backend={backend}"
    assert "NVIDIA GPUs (CUDA) only" in err.value.reason and "use backend inductor" in str(err.value)
    # on a CUDA machine without the package, the message says what to install (no GPU is touched here)
    with pytest.raises(UnavailableError, match=f"pip install {package}"):
        unit.check(CompileConfig(backend=backend), _ctx(device="cuda"))


def test_openvino_missing_or_off_cpu_is_unavailable_with_the_fix(monkeypatch):
    unit = get_unit("compile")
    with pytest.raises(UnavailableError, match="runs on cuda.*use backend inductor"):
        unit.check(CompileConfig(backend="openvino"), _ctx(device="cuda"))
    monkeypatch.setattr(compile_unit, "package_available", lambda name: name != "openvino")
    with pytest.raises(UnavailableError, match=r"openvino package is not installed. pip install openvino"):
        unit.check(CompileConfig(backend="openvino"), _ctx())


def test_inductor_without_a_cxx_compiler_is_unavailable(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_unit.shutil, "which", lambda name: None)
    with pytest.raises(UnavailableError, match="needs a C\\+\\+ compiler.*install g\\+\\+"):
        get_unit("compile").check(CompileConfig(), _ctx())


def test_an_unavailable_backend_falls_back_to_frozen_inductor_on_a_cpu():
    if compile_unit._cxx_compiler() is None:
        pytest.skip("no C++ compiler: inductor cannot be the fallback here")
    kept, notes = resolve_available([CompileConfig(backend="tensorrt", dynamic=True, targets="unet+vae")], _ctx())
    assert kept == [CompileConfig(backend="inductor", freezing=True, dynamic=True, targets="unet+vae")]
    assert len(notes) == 1 and "compile.backend=tensorrt unavailable" in notes[0] and "freezing=True" in notes[0]


def test_offload_and_whole_unet_compiles_conflict_with_deepcache():
    units = all_units()
    offload = units["offload"].config_cls(mode="model")
    with pytest.raises(ConflictError, match="compile.*offload|offload.*compile"):
        check_conflicts([offload, CompileConfig()])
    deepcache = units["deepcache"].config_cls()
    for cfg in (CompileConfig(backend="openvino"), CompileConfig(granularity="whole")):
        with pytest.raises(ConflictError, match="DeepCache decides in Python"):
            check_conflicts([deepcache, cfg])
    check_conflicts([deepcache, CompileConfig(backend="inductor")])  # auto -> blocks: combines


# ---------------------------------------------------------------- the weight watch


def test_weight_watch_sees_every_kind_of_in_place_change():
    unet = _micro_unet()
    weight = unet.conv_in.weight
    watch = WeightWatch(unet)
    assert watch.changed() is None
    with torch.no_grad():
        weight.add_(1e-3)  # bumps the version counter
    assert watch.changed() == "conv_in.weight"
    watch = WeightWatch(unet)
    weight.data.add_(1e-3)  # LoRA-style merge through .data: no version bump, values differ
    assert watch.changed() == "conv_in.weight"
    watch = WeightWatch(unet)
    weight.data = weight.data.clone()  # same values, new storage
    assert watch.changed() == "conv_in.weight"
    watch = WeightWatch(unet)
    with torch.inference_mode():
        unet(**_inputs(unet, 2, 8, 8))  # running the model changes nothing
    assert watch.changed() is None


# ---------------------------------------------------------------- OpenVINO


@needs_openvino
def test_openvino_static_matches_eager_on_tiny_sd15_and_converts_once_per_shape(sd15):
    unet = sd15.unet
    handle = _apply(sd15, CompileConfig(backend="openvino", dynamic=False))
    try:
        first = _inputs(unet, 2, 8, 8, seed=1)
        torch.testing.assert_close(_compiled(unet, first), _eager(unet, first), **TOL)
        assert _totals(handle)["graphs"] == 1
        again = _inputs(unet, 2, 8, 8, seed=2)  # same shapes, new values: no conversion
        torch.testing.assert_close(_compiled(unet, again), _eager(unet, again), **TOL)
        assert _totals(handle)["graphs"] == 1
        other = _inputs(unet, 4, 16, 8, seed=3)  # new batch and size: one more conversion, counted
        torch.testing.assert_close(_compiled(unet, other), _eager(unet, other), **TOL)
        with torch.inference_mode():  # a Python-number timestep and return_dict=True, as the contract suite calls
            out = unet(first["sample"], 500, encoder_hidden_states=first["encoder_hidden_states"]).sample
        torch.testing.assert_close(out, _eager(unet, dict(first, timestep=500)), **TOL)
        totals = _totals(handle)
        assert totals["graphs"] == 2 and totals["compile_s"] > 0 and totals["eager_calls"] == 0
    finally:
        handle.remove()


@needs_openvino
def test_openvino_dynamic_sdxl_with_added_cond_converts_once_for_all_sizes(sdxl):
    unet = sdxl.unet
    handle = _apply(sdxl, CompileConfig(backend="openvino", dynamic=True), "sdxl-base")
    try:
        for batch, height, width in ((2, 8, 8), (4, 16, 8), (2, 8, 16)):
            kwargs = _inputs(unet, batch, height, width, seed=batch + height, xl=True)
            torch.testing.assert_close(_compiled(unet, kwargs), _eager(unet, kwargs), **TOL)
        assert _totals(handle)["graphs"] == 1
        # a latent that does not divide by the UNet's upsampling factor (4 here) takes a different code path
        # in diffusers (explicit upsample sizes), which a trace bakes in: one more conversion, then shared
        for batch, height, width in ((2, 10, 8), (2, 14, 16)):
            kwargs = _inputs(unet, batch, height, width, seed=height, xl=True)
            torch.testing.assert_close(_compiled(unet, kwargs), _eager(unet, kwargs), **TOL)
        assert _totals(handle)["graphs"] == 2
    finally:
        handle.remove()


@needs_openvino
def test_openvino_vae_decoder_target_matches_eager(sd15):
    handle = _apply(sd15, CompileConfig(backend="openvino", dynamic=True, targets="unet+vae"))
    try:
        g = torch.Generator().manual_seed(4)
        with torch.inference_mode():
            latents = torch.randn(1, 4, 8, 8, generator=g)
            out = sd15.vae.decode(latents).sample
            ref = sd15.vae.decoder.__class__.forward(sd15.vae.decoder, sd15.vae.post_quant_conv(latents))
        torch.testing.assert_close(out, ref, **TOL)
        stats = compile_stats(handle)
        assert stats["vae_decoder"].graphs == 1 and stats["unet"].graphs == 0  # lazy: only what ran was built
    finally:
        handle.remove()


@needs_openvino
def test_openvino_text_encoder_target_matches_eager_and_leaves_hidden_state_calls_eager(sd15):
    encoder = sd15.text_encoder
    ids = sd15.tokenizer(["a lighthouse at dawn"], padding="max_length", max_length=sd15.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = type(encoder).forward(encoder, ids)
    handle = _apply(sd15, CompileConfig(backend="openvino", targets="unet+vae+text_encoder"))
    try:
        with torch.inference_mode():
            out = encoder(ids)  # as diffusers' encode_prompt calls it (attention_mask None), then takes [0]
            plain = encoder(ids, return_dict=False)
            hidden = encoder(ids, output_hidden_states=True)  # clip skip / SDXL: needs what the graph does not give
        torch.testing.assert_close(out[0], ref.last_hidden_state, **TOL)
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, **TOL)
        assert isinstance(plain, tuple)
        torch.testing.assert_close(plain[0], ref.last_hidden_state, **TOL)
        assert torch.equal(hidden.last_hidden_state, ref.last_hidden_state) and len(hidden.hidden_states) > 1
        stats = compile_stats(handle)
        assert stats["text_encoder"].graphs == 1 and stats["text_encoder"].eager_calls == 1
    finally:
        handle.remove()
    assert "forward" not in encoder.__dict__
    with torch.inference_mode():
        assert torch.equal(encoder(ids).last_hidden_state, ref.last_hidden_state)


@needs_openvino
def test_openvino_runs_eager_for_inputs_it_cannot_take():
    pipe = _micro_pipe()
    unet = pipe.unet
    handle = _apply(pipe, CompileConfig(backend="openvino"))
    try:
        kwargs = dict(_inputs(unet, 2, 8, 8), class_labels=torch.tensor([1, 2]))
        torch.testing.assert_close(_compiled(unet, kwargs), _eager(unet, kwargs), rtol=0, atol=0)
        assert _totals(handle) == {"graphs": 0, "rebuilds": 0, "eager_calls": 1, "compile_s": 0.0}
    finally:
        handle.remove()


@needs_openvino
def test_openvino_rebuilds_after_an_in_place_weight_change():
    pipe = _micro_pipe()
    unet = pipe.unet
    kwargs = _inputs(unet, 2, 8, 8)
    handle = _apply(pipe, CompileConfig(backend="openvino"))
    try:
        before = _compiled(unet, kwargs)
        target = handle.info["targets"][0]
        baked = next(iter(target.engine.models.values()))
        _nudge_weights(unet)
        fresh = _eager(unet, kwargs)
        assert (fresh - before).abs().max() > 1e-2
        bound, _ = target.io.prepare((), dict(kwargs))
        with torch.inference_mode():  # the converted model itself still computes with the old weights
            stale = torch.from_numpy(baked([t.numpy() for t in target.io.ov_tensors(bound)])[0])
        torch.testing.assert_close(stale, before, **TOL)
        torch.testing.assert_close(_compiled(unet, kwargs), fresh, **TOL)  # through the unit: rebuilt
        assert _totals(handle)["graphs"] == 2 and _totals(handle)["rebuilds"] == 1
    finally:
        handle.remove()


@needs_openvino
def test_a_weight_change_with_the_error_policy_stops_with_the_fix():
    pipe = _micro_pipe()
    unet = pipe.unet
    kwargs = _inputs(unet, 2, 8, 8)
    handle = _apply(pipe, CompileConfig(backend="openvino", on_weight_change="error"))
    try:
        _compiled(unet, kwargs)
        _nudge_weights(unet)
        with pytest.raises(StaleCompileError, match="conv_in.weight.*changed.*on_weight_change=recompile"):
            _compiled(unet, kwargs)
        assert _totals(handle)["graphs"] == 1
    finally:
        handle.remove()


@needs_openvino
def test_remove_restores_the_eager_forward_and_drops_the_compiled_model():
    pipe = _micro_pipe()
    unet = pipe.unet
    kwargs = _inputs(unet, 2, 8, 8)
    reference = _eager(unet, kwargs)
    handle = _apply(pipe, CompileConfig(backend="openvino"))
    assert "forward" in unet.__dict__ and "compile" in installed(pipe)
    _compiled(unet, kwargs)
    target = handle.info["targets"][0]
    model = weakref.ref(next(iter(target.engine.models.values())))
    handle.remove()
    gc.collect()
    assert "forward" not in unet.__dict__ and not installed(pipe)
    assert model() is None and target.watch is None
    with torch.inference_mode():
        assert torch.equal(unet(**kwargs).sample, reference)


@needs_openvino
def test_sampler_end_to_end_with_openvino_compiles_once_and_matches_eager(cache):
    model = ModelRef.synthetic("sd15", tiny=True)
    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=3, seed=5, cfg=7.0)
    eager = run(PipelineSpec(model=model, device="cpu"), request, cache=cache)
    spec = PipelineSpec(model=model, device="cpu", optimizations=(CompileConfig(backend="openvino"),))
    first = run(spec, request, cache=cache)
    second = run(spec, request, cache=cache)
    assert first.stats.counters["compile_graphs"] == 1 and first.stats.counters["compile_s"] > 0
    assert any("compile (openvino): built 1 graph(s) for unet" in n for n in first.stats.notes)
    assert "compile_graphs" not in second.stats.counters  # prepared once, compiled once
    assert cache.applies == 2 and second.stats.cache == "hit"
    for result in (first, second):
        torch.testing.assert_close(result.images_tensor, eager.images_tensor, rtol=0, atol=1e-4)
    back = run(PipelineSpec(model=model, device="cpu"), request, cache=cache)  # compile removed: eager again
    assert torch.equal(back.images_tensor, eager.images_tensor)


# ---------------------------------------------------------------- inductor (torch.compile)


@needs_cxx
def test_inductor_dynamic_compiles_once_for_all_sizes_and_reads_live_weights():
    pipe = _micro_pipe()
    unet = pipe.unet
    handle = _apply(pipe, CompileConfig(backend="inductor", dynamic=True))
    try:
        for batch, height, width in ((2, 8, 8), (2, 16, 8), (4, 8, 16)):
            kwargs = _inputs(unet, batch, height, width, seed=height + width)
            torch.testing.assert_close(_compiled(unet, kwargs), _eager(unet, kwargs), **TOL)
        assert _totals(handle)["graphs"] == 1
        _nudge_weights(unet)  # without freezing the weights are graph inputs: no rebuild needed
        torch.testing.assert_close(_compiled(unet, kwargs), _eager(unet, kwargs), **TOL)
        assert _totals(handle)["graphs"] == 1 and _totals(handle)["rebuilds"] == 0
    finally:
        handle.remove()
    freed = weakref.ref(unet)  # removal released the compiled graphs, and through them the UNet
    del pipe, unet, handle
    gc.collect()
    assert freed() is None


@needs_cxx
def test_inductor_freezing_rebuilds_after_a_weight_change():
    """Freezing turns weights into graph constants; whether a constant still aliases the parameter or is a
    folded copy (channels-last / prepacked) is an inductor heuristic, so any change means a rebuild."""
    pipe = _micro_pipe()
    unet = pipe.unet
    kwargs = _inputs(unet, 2, 8, 8)
    handle = _apply(pipe, CompileConfig(backend="inductor", freezing=True))
    try:
        old = _compiled(unet, kwargs)
        torch.testing.assert_close(old, _eager(unet, kwargs), **TOL)
        _nudge_weights(unet)
        fresh = _eager(unet, kwargs)
        assert (fresh - old).abs().max() > 1e-2
        torch.testing.assert_close(_compiled(unet, kwargs), fresh, **TOL)
        assert _totals(handle)["graphs"] == 2 and _totals(handle)["rebuilds"] == 1
        torch.testing.assert_close(_compiled(unet, kwargs), fresh, **TOL)  # and only once
        assert _totals(handle)["graphs"] == 2
    finally:
        handle.remove()


def _eager_backend(gm, example_inputs):
    return gm.forward


def test_each_compile_keeps_its_own_dynamo_cache_and_frees_it_on_remove():
    """Compiling a module's shared `forward` makes PyTorch give up (run eager) from the 9th compile of that
    code on; private entry functions keep each compile's graphs apart, and removal frees them."""
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    cfg = CompileConfig()
    x = torch.randn(2, 4)
    built = []
    for _ in range(10):
        patch = PatchSet("compile-test")
        target = compile_unit.CompileTarget(module, compile_unit._BlockIO, cfg,
                                      lambda t: compile_unit._DynamoEngine(lambda: _eager_backend, False, "test"))
        compile_unit._install(patch, module, target)
        torch.testing.assert_close(module(x), module.__class__.forward(module, x), rtol=0, atol=0)
        built.append(target.counts.graphs)
        compiled = weakref.ref(target.engine.compiled)
        patch.remove()
        gc.collect()
        assert compiled() is None and "forward" not in module.__dict__
    assert built == [1] * 10
    freed = weakref.ref(module)
    del module, target, patch
    gc.collect()
    assert freed() is None  # dynamo's process-wide tables keep nothing of the model


# ---------------------------------------------------------------- run scope: compile time apart, checks per run


@needs_openvino
def test_run_scope_reports_compile_time_and_checks_weights_once_per_run():
    pipe = _micro_pipe()
    unet = pipe.unet
    cfg = CompileConfig(backend="openvino")
    handle = _apply(pipe, cfg)
    unit = get_unit("compile")
    kwargs = _inputs(unet, 2, 8, 8)
    try:
        runs = []
        for step in range(2):
            context = RunContext(pipe=pipe, family=get_family("sd15"), device="cpu", steps=1, batch=1, cfg_steps=1)
            with unit.run_scope(cfg, handle, context):
                assert handle.info["targets"][0].in_run
                _compiled(unet, kwargs)
            runs.append(context)
            _nudge_weights(unet)
        assert runs[0].counters["compile_graphs"] == 1 and runs[0].counters["compile_s"] > 0
        assert "compile_rebuilds" not in runs[0].counters
        assert runs[1].counters == {"compile_rebuilds": 1, "compile_graphs": 1,
                                    "compile_s": runs[1].counters["compile_s"]}
        assert any("recompiled with the new weights" in n for n in runs[1].notes)
        assert not handle.info["targets"][0].in_run
    finally:
        handle.remove()


# ---------------------------------------------------------------- DeepCache: layer-by-layer compile


@needs_cxx
def test_deepcache_with_inductor_compiles_layers_once_not_every_step():
    units = all_units()
    from contextlib import ExitStack

    from sdaccel.optim.core.registry import apply_all, remove_all

    def steps(pipe, handles):
        context = RunContext(pipe=pipe, family=get_family("sd15"), device="cpu", steps=6, batch=1, cfg_steps=6)
        outs = []
        with ExitStack() as stack:
            for h in handles:
                scope = units[h.name].run_scope(h.info["config"], h, context)
                if scope is not None:
                    stack.enter_context(scope)
            for i in range(6):
                context.step = i
                outs.append(_compiled(pipe.unet, _inputs(pipe.unet, 2, 8, 8, seed=i)))
        return outs, context

    pipe = _micro_pipe()
    deepcache = units["deepcache"].config_cls(cache_interval=3)
    handles = apply_all(pipe, [deepcache], _ctx())
    reference, _ = steps(pipe, handles)
    remove_all(handles)
    handles = apply_all(pipe, [deepcache, CompileConfig(backend="inductor")], _ctx())
    try:
        compiled = handles[-1]
        assert compiled.info["granularity"] == "blocks"
        outs, context = steps(pipe, handles)
        layers = len(compiled.info["targets"])
        assert layers >= 10 and context.counters["compile_graphs"] == layers  # one graph per layer, not per step
        assert context.counters["deepcache_cached_steps"] == 4
        for out, ref in zip(outs, reference):
            torch.testing.assert_close(out, ref, **TOL)
    finally:
        remove_all(handles)


# ---------------------------------------------------------------- slow: inductor on the tiny family UNets


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize("family", ["sd15", "sdxl-base"])
def test_inductor_freezing_matches_eager_on_tiny_family_unets(family, sd15, sdxl):
    pipe = sd15 if family == "sd15" else sdxl
    unet = pipe.unet
    handle = _apply(pipe, CompileConfig(backend="inductor", freezing=True), family)
    try:
        kwargs = _inputs(unet, 2, 8, 8, xl=family != "sd15")
        torch.testing.assert_close(_compiled(unet, kwargs), _eager(unet, kwargs), **TOL)
        assert _totals(handle)["graphs"] == 1
    finally:
        handle.remove()


@pytest.mark.slow
@needs_cxx
def test_inductor_static_shapes_compile_once_per_size():
    pipe = _micro_pipe()
    unet = pipe.unet
    handle = _apply(pipe, CompileConfig(backend="inductor", dynamic=False))
    try:
        for batch, height, width in ((2, 8, 8), (2, 16, 8), (2, 8, 8)):
            kwargs = _inputs(unet, batch, height, width, seed=height)
            torch.testing.assert_close(_compiled(unet, kwargs), _eager(unet, kwargs), **TOL)
        assert _totals(handle)["graphs"] == 2
    finally:
        handle.remove()


@pytest.mark.slow
@needs_cxx
def test_sampler_end_to_end_with_inductor_freezing(cache):
    model = ModelRef.synthetic("sd15", tiny=True)
    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=3, seed=5, cfg=7.0)
    eager = run(PipelineSpec(model=model, device="cpu"), request, cache=cache)
    spec = PipelineSpec(model=model, device="cpu",
                        optimizations=(CompileConfig(backend="inductor", freezing=True, targets="unet+vae"),))
    first = run(spec, request, cache=cache)
    second = run(spec, request, cache=cache)
    assert first.stats.counters["compile_graphs"] == 2 and first.stats.counters["compile_s"] > 0
    assert "compile_graphs" not in second.stats.counters
    for result in (first, second):
        torch.testing.assert_close(result.images_tensor, eager.images_tensor, rtol=0, atol=1e-4)
