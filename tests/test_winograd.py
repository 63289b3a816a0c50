"""Winograd convolution: exact to fp32 rounding against F.conv2d, reversible, weight-change safe,
measured per shape once per machine and never chosen where it is slower."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from sdaccel.cpukernels.adapter import FilterCache, WinogradConv2d, patch_convs
from sdaccel.cpukernels.calibrate import MARGIN, MEASUREMENT, Calibration, best_choice
from sdaccel.cpukernels.winograd import (
    filter_transform,
    input_transform,
    input_transform_reference,
    is_eligible,
    winograd_conv2d,
)

BOUNDS = {2: 1e-5, 4: 1e-4, 6: 1e-4}  # max |diff| / max |F.conv2d|, fp32


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("n, c, k, h, w, pad", [(2, 8, 5, 16, 16, 1), (1, 3, 4, 13, 7, 1), (2, 16, 16, 9, 11, 0),
                                                 (1, 4, 6, 5, 5, 1), (1, 32, 8, 3, 3, 1)])
@pytest.mark.parametrize("band", [None, 1, 3])
def test_matches_conv2d_to_fp32_rounding(m, n, c, k, h, w, pad, band):
    g = torch.Generator().manual_seed(m * 100 + h)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, 3, 3, generator=g) * 0.2
    bias = torch.randn(k, generator=g)
    ref = F.conv2d(x, weight, bias, padding=pad)
    out = winograd_conv2d(x, filter_transform(weight, m), bias, m=m, padding=pad, band_tiles=band)
    assert out.shape == ref.shape
    assert _rel(out, ref) < BOUNDS[m]


@pytest.mark.parametrize("m", [2, 4, 6])
def test_gemm_input_transform_equals_the_matrix_definition(m):
    x = torch.randn(2, 5, 3 * m + 2, 2 * m + 2)
    torch.testing.assert_close(input_transform(x, m, 3, 2), input_transform_reference(x, m, 3, 2), rtol=1e-5,
                               atol=1e-5)


def test_sd_layer_shapes_stay_within_the_error_budget():
    """Channel counts of SD's UNet/VAE at reduced maps (error depends on channels and tile, not on map size)."""
    g = torch.Generator().manual_seed(0)
    for c, k in [(320, 320), (640, 640), (1280, 1280), (2560, 1280), (128, 128), (512, 512), (4, 320)]:
        x = torch.randn(1, c, 12, 12, generator=g)
        weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)
        ref = F.conv2d(x, weight, padding=1)
        for m in (2, 4):
            assert _rel(winograd_conv2d(x, filter_transform(weight, m), None, m=m, padding=1), ref) < BOUNDS[m]


def test_eligibility():
    assert is_eligible(torch.nn.Conv2d(4, 4, 3, padding=1))
    assert is_eligible(torch.nn.Conv2d(4, 4, 3, padding=0))
    for conv in (torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.nn.Conv2d(4, 4, 1),
                 torch.nn.Conv2d(4, 4, 3, padding=1, groups=2), torch.nn.Conv2d(4, 4, 3, padding=1, dilation=2),
                 torch.nn.Conv2d(4, 4, 3, padding=2), torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")):
        assert not is_eligible(conv)


def _always(m):
    """A planner that wants tile m everywhere, within the filter budget."""
    return lambda layer, x: ("winograd", m, 0) if layer.reserve(m) else ("conv2d", 0, 0)


def test_adapter_shares_parameters_and_restore_puts_the_originals_back():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 3, stride=2))
    keys = list(net.state_dict())
    original = net[0]
    patched = patch_convs(net, _always(4), FilterCache(2**30))
    assert isinstance(net[0], WinogradConv2d) and isinstance(net[0], torch.nn.Conv2d)
    assert net[0].weight is original.weight and list(net.state_dict()) == keys
    assert type(net[2]) is torch.nn.Conv2d  # stride 2: not eligible, untouched
    x = torch.randn(1, 3, 10, 10)
    with torch.inference_mode():
        out = net(x)
    patched.restore()
    assert net[0] is original
    with torch.inference_mode():
        assert _rel(out, net(x)) < 1e-4


class _HostConv(torch.nn.Conv2d):
    """A host's own Conv2d class (ComfyUI's comfy.ops ones are subclasses like this)."""


def test_hooks_run_a_hosts_conv_subclasses_and_leave_the_module_tree_and_forwards_as_they_were():
    from sdaccel.cpukernels.adapter import hook_convs

    net = torch.nn.Sequential(_HostConv(3, 8, 3, padding=1), torch.nn.SiLU(), _HostConv(8, 8, 3, padding=1),
                              torch.nn.Conv2d(8, 8, 3, stride=2))
    marker = []

    def previous_forward(x):  # an instance forward someone set before us must survive and be what runs after
        marker.append(1)
        return _HostConv.forward(net[2], x)

    net[2].forward = previous_forward
    modules = list(net.modules())
    x = torch.randn(1, 3, 10, 10)
    with torch.inference_mode():
        reference = net(x)
    hooked = hook_convs(net, _always(4), FilterCache(2**30))
    assert [h.conv for h in hooked.hooks] == [net[0], net[2]]  # stride 2: not eligible
    hooked.install()
    with torch.inference_mode():
        out = net(x)
    assert _rel(out, reference) < 1e-4 and hooked.calls()["winograd"] == 2
    hooked.uninstall()
    assert list(net.modules()) == modules and "forward" not in net[0].__dict__
    assert net[2].__dict__["forward"] is previous_forward
    marker.clear()
    with torch.inference_mode():
        assert torch.equal(net(x), reference) and marker == [1]
    hooked.install()
    net[2].forward = lambda x: x  # another patch put on top of ours: taking ours out would drop it, so refused
    with pytest.raises(RuntimeError, match="another patch"):
        hooked.uninstall()


def test_hook_filters_follow_a_replaced_weight_and_a_hosts_per_call_cast():
    from sdaccel.cpukernels.adapter import hook_convs

    conv = _HostConv(4, 6, 3, padding=1)
    casts = []

    def host_weights(layer, x):  # a host casting its stored weight to the input's dtype on every call
        casts.append(1)
        return layer.weight.to(x.dtype), layer.bias.to(x.dtype)

    hooked = hook_convs(conv, _always(4), FilterCache(2**30), weights=host_weights)
    x = torch.randn(2, 4, 9, 9)
    hooked.install()
    try:
        with torch.inference_mode():
            conv(x)
            for scale in (0.5, 2.0, 0.5):  # a LoRA at one strength, another, the first again: new tensors each
                new = torch.nn.Parameter(conv.weight.detach() * scale)
                conv.weight = new
                out = conv(x)
                assert _rel(out, F.conv2d(x, new, conv.bias, padding=1)) < 1e-4, scale
    finally:
        hooked.uninstall()
    assert len(casts) == 4

    def per_call(layer, x):  # weights the host makes per call (a LoRA as a weight function): the host's call
        return None

    hooked = hook_convs(conv, _always(4), FilterCache(2**30), weights=per_call)
    hooked.install()
    with torch.inference_mode():
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    hooked.uninstall()
    assert hooked.calls() == {"conv2d": 0, "winograd": 0, "host": 1}


def test_a_hook_on_a_convolution_winograd_cannot_compute_is_refused():
    from sdaccel.cpukernels.adapter import WinogradHook

    with pytest.raises(ValueError, match="3x3 stride-1"):
        WinogradHook(torch.nn.Conv2d(4, 4, 3, stride=2), _always(4), FilterCache(2**30))


def test_filters_are_refreshed_when_the_weight_changes():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    adapter = WinogradConv2d(conv, _always(4), FilterCache(2**30))
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        adapter(x)
        conv.weight.add_(0.5)  # a LoRA patching the weight in place
        fresh = adapter(x)
        ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert _rel(fresh, ref) < 1e-4
    conv.weight = torch.nn.Parameter(conv.weight.detach() * 2)  # a new tensor entirely
    adapter.weight = conv.weight
    with torch.no_grad():
        assert _rel(adapter(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) < 1e-4


def test_filter_budget_bounds_memory_and_layers_without_room_stay_on_conv2d():
    cache = FilterCache(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1))
    patch_convs(net, _always(2), cache)
    with torch.inference_mode():
        net(torch.randn(1, 4, 8, 8))
    assert cache.used == 0 and cache.peak == 0 and cache.refused == 2
    assert [layer.calls for layer in net] == [{"conv2d": 1, "winograd": 0}] * 2
    roomy = FilterCache(2**20)
    net2 = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1))
    patched = patch_convs(net2, _always(4), roomy)
    with torch.inference_mode():
        net2(torch.randn(1, 4, 8, 8))
        net2(torch.randn(1, 4, 8, 8))
    assert roomy.used == 36 * 4 * 4 * 4 and net2[0].calls == {"conv2d": 0, "winograd": 2}
    patched.restore()
    assert roomy.used == 0


def test_packed_filters_are_the_only_copy_kept():
    """With oneDNN-packed filters, the kept U holds no storage: the filter memory is what the budget counts."""
    from sdaccel.cpukernels.winograd import mkldnn_linear_available

    if not mkldnn_linear_available():
        pytest.skip("this torch has no oneDNN linear packing: U itself is the kept copy")
    net = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1))
    patch_convs(net, _always(4), FilterCache(2**24))
    with torch.inference_mode():
        net(torch.randn(1, 16, 16, 16))
    (stamp, kept, packed), = net[0]._filters.by_tile.values()
    assert packed is not None and kept.shape[1:] == (16, 16)
    assert kept.untyped_storage().nbytes() == 0  # not a view of the full U (36 x 16 x 16 floats)


def test_best_choice_keeps_conv2d_unless_winograd_is_clearly_faster():
    assert best_choice({"conv2d": 1.0, "f2b0": 0.99, "f4b0": 0.98}) == ("conv2d", 0, 0)
    assert best_choice({"conv2d": 1.0, "f2b0": 0.8, "f4b2": 0.5, "filter_transform_f4": 0.01}) == ("winograd", 4, 2)
    assert best_choice({"conv2d": 1.0, "f2b0": MARGIN}) == ("winograd", 2, 0)


def test_calibration_is_measured_once_and_kept_on_disk(tmp_path):
    first = Calibration(tmp_path, repeats=1)
    choice = first.choose(1, 8, 8, 12, 12, 1, torch.float32, torch.device("cpu"))
    assert first.measured_shapes == 1 and first.path.exists()
    second = Calibration(tmp_path, repeats=1)
    assert second.choose(1, 8, 8, 12, 12, 1, torch.float32, torch.device("cpu")) == choice
    assert second.measured_shapes == 0
    first.path.write_text("{not json", encoding="utf-8")
    third = Calibration(tmp_path, repeats=1)  # a damaged file is ignored and rebuilt
    third.choose(1, 8, 8, 12, 12, 1, torch.float32, torch.device("cpu"))
    assert third.measured_shapes == 1 and json.loads(third.path.read_text())["shapes"]
    stale = json.loads(third.path.read_text())
    stale.pop("measurement")  # a file timed the old way (hot caches) is not trusted
    third.path.write_text(json.dumps(stale), encoding="utf-8")
    fourth = Calibration(tmp_path, repeats=1)
    fourth.choose(1, 8, 8, 12, 12, 1, torch.float32, torch.device("cpu"))
    assert fourth.measured_shapes == 1 and json.loads(fourth.path.read_text())["measurement"] == MEASUREMENT


def test_a_shape_known_at_another_batch_size_is_not_measured_again(tmp_path, monkeypatch):
    """ComfyUI meets a layer batched (cond + uncond) and one pass at a time: the second layout reuses the first's
    measurement, scaled to its batch; a shape never measured at any batch is still measured."""
    from sdaccel.cpukernels import calibrate
    from sdaccel.optim.core.registry import RunContext
    from sdaccel.optim.units.winograd.unit import WinogradConfig, WinogradPlanner

    planner = WinogradPlanner(WinogradConfig(kernel="pytorch", fused_transforms=False), str(tmp_path))
    cpu = torch.device("cpu")
    planner.calibration.table[calibrate.shape_key(2, 8, 16, 12, 12, 1, torch.float32, cpu)] = \
        {"conv2d": 1.0, "f2b0": 0.9, "f4b0": 0.5}
    planner.calibration.table[calibrate.shape_key(8, 8, 16, 12, 12, 1, torch.float32, cpu)] = \
        {"conv2d": 1.0, "f2b0": 0.5, "f4b0": 0.9}
    measured = []
    monkeypatch.setattr(calibrate, "measure_shape", lambda *a, **k: measured.append(a[:5]) or {"conv2d": 1.0})
    planner.run = RunContext(pipe=None, family=None, device="cpu", steps=1, batch=1, cfg_steps=1)
    cache = FilterCache(2**30)
    layer = WinogradConv2d(torch.nn.Conv2d(8, 16, 3, padding=1), planner, cache)
    assert planner(layer, torch.randn(1, 8, 12, 12)) == ("winograd", 4, 0)  # batch 2's winner: the nearest batch
    assert planner.calibration.other_batch(1, 8, 16, 12, 12, 1, torch.float32, cpu) == \
        (2, {"conv2d": 0.5, "f2b0": 0.45, "f4b0": 0.25})  # per call, scaled to one image
    assert planner(layer, torch.randn(6, 8, 12, 12)) == ("winograd", 2, 0)  # nearer to 8 than to 2
    assert not measured and planner.run.counters["winograd_shapes_from_another_batch"] == 2
    other = WinogradConv2d(torch.nn.Conv2d(8, 8, 3, padding=1), planner, cache)  # another shape: measured
    assert planner(other, torch.randn(1, 8, 12, 12)) == ("conv2d", 0, 0)
    assert measured == [(1, 8, 8, 12, 12)]


def test_a_failed_calibration_save_keeps_the_old_table_and_no_partial_file(tmp_path, monkeypatch):
    calib = Calibration(tmp_path, repeats=1)
    calib.choose(1, 8, 8, 12, 12, 1, torch.float32, torch.device("cpu"))
    before = calib.path.read_bytes()
    calib.table["extra"] = {"conv2d": 1.0}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        calib.save()
    assert calib.path.read_bytes() == before
    assert sorted(p.name for p in calib.folder.iterdir()) == [calib.path.name]


def test_the_staged_search_measures_every_tile_but_only_the_fastest_tiles_bands():
    from sdaccel.cpukernels.calibrate import measure_shape, parse_candidate

    seen = []
    timings = measure_shape(1, 8, 8, 24, 24, 1, tiles=(2, 4), bands=(0, 1, 2, 4), repeats=2,
                            progress=lambda done, total: seen.append((done, total)))
    tiled = {parse_candidate(name) for name in timings} - {None}
    assert {(2, 0), (4, 0)} <= tiled and "conv2d" in timings
    banded = {m for m, band in tiled if band}
    assert len(banded) == 1  # the bands of one tile: the faster on the whole map
    assert len(tiled) == 2 + 3 < 2 * 4  # not every tile with every band
    assert [done for done, _ in seen] == list(range(len(timings))) + [len(timings)]
    assert seen[-1][0] == seen[-1][1]  # the last call says it is done


def test_an_interrupt_during_calibration_stops_it_and_keeps_nothing_half_measured(tmp_path):
    calib = Calibration(tmp_path, repeats=1)
    calib.choose(1, 8, 8, 12, 12, 1, torch.float32, torch.device("cpu"))
    before = calib.path.read_bytes()
    calls = []

    class Stop(Exception):
        pass

    def interrupt_at_the_third_candidate(done, total):
        calls.append(done)
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        calib.timings(1, 8, 16, 12, 12, 1, torch.float32, torch.device("cpu"),
                      progress=interrupt_at_the_third_candidate)
    assert calls == [0, 1, 2]  # stopped between two candidates, not at the end of the shape
    assert calib.path.read_bytes() == before and len(calib.table) == 1 and calib.measured_shapes == 1
    assert not calib.known(1, 8, 16, 12, 12, 1, torch.float32, torch.device("cpu"))
    calib.timings(1, 8, 16, 12, 12, 1, torch.float32, torch.device("cpu"))  # the next use measures it whole
    assert calib.known(1, 8, 16, 12, 12, 1, torch.float32, torch.device("cpu")) and len(calib.table) == 2


def test_a_first_use_calibration_is_shown_and_interruptible_inside_the_step(cache, tmp_path):
    """The engine's sampler polls its interrupt during a unit's long first-use work, not only between steps."""
    from sdaccel.optim.run.sampler import run
    from sdaccel.optim.spec.errors import GenerationInterrupted
    from sdaccel.optim.spec.model_ref import ModelRef
    from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
    from sdaccel.optim.units.winograd.unit import WinogradConfig

    cfg = WinogradConfig(vae=False, fused_transforms=False, calibration_dir=str(tmp_path))
    spec = PipelineSpec(model=ModelRef.synthetic("sd15", tiny=True), device="cpu").with_optimization(cfg)
    req = GenerationRequest(prompt="a barn", width=64, height=64, steps=2, seed=3)
    polls = []

    def stop_at_the_third_poll():  # the first poll is before step 1; the next ones come from the calibration
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(GenerationInterrupted) as err:
        run(spec, req, cache=cache, should_interrupt=stop_at_the_third_poll, progress=lambda i, n: polls.append(0))
    assert err.value.step == 0 and 0 not in polls  # inside the first step, before it ended
    table = Calibration(tmp_path).table
    done = run(spec, req, cache=cache)  # the next run measures what is left and completes
    assert done.stats.counters["winograd_calibrated_shapes"] >= 1
    assert len(Calibration(tmp_path).table) == len(table) + done.stats.counters["winograd_calibrated_shapes"]


def test_unit_on_a_tiny_pipeline_is_exact_to_rounding_and_reports_calls(cache, tmp_path):
    from sdaccel.optim.run.sampler import run
    from sdaccel.optim.spec.model_ref import ModelRef
    from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
    from sdaccel.optim.units.winograd.unit import WinogradConfig

    spec = PipelineSpec(model=ModelRef.synthetic("sd15", tiny=True), device="cpu")
    req = GenerationRequest(prompt="a barn", width=64, height=64, steps=2, seed=3)
    base = run(spec, req, cache=cache)
    for tile in ("f2", "f4", "auto"):
        cfg = WinogradConfig(tile=tile, vae=True, calibration_dir=str(tmp_path))
        result = run(spec.with_optimization(cfg), req, cache=cache)
        torch.testing.assert_close(result.images_tensor, base.images_tensor, rtol=0, atol=2e-4)
        calls = result.stats.counters
        assert calls.get("winograd_calls", 0) + calls.get("winograd_conv2d_calls", 0) > 0
        if tile != "auto":
            assert calls["winograd_calls"] > 0
    assert torch.equal(run(spec, req, cache=cache).images_tensor, base.images_tensor)


def test_half_precision_stays_on_conv2d_and_gpus_are_refused(cache, tmp_path):
    from sdaccel.optim.core.registry import ApplyContext, apply_all
    from sdaccel.optim.models.families import get_family
    from sdaccel.optim.spec.errors import UnavailableError
    from sdaccel.optim.testing.random_weights import build_pipeline
    from sdaccel.optim.units.winograd.unit import WinogradConfig, WinogradPlanner

    planner = WinogradPlanner(WinogradConfig(fused_transforms=False), str(tmp_path))
    layer = WinogradConv2d(torch.nn.Conv2d(8, 8, 3, padding=1), planner, FilterCache(2**20))
    assert planner(layer, torch.randn(1, 8, 32, 32, dtype=torch.bfloat16))[0] == "conv2d"
    with pytest.raises(UnavailableError, match="cuDNN"):
        apply_all(build_pipeline("sd15", tiny=True), [WinogradConfig()],
                  ApplyContext(device=torch.device("cuda"), family=get_family("sd15")))


def test_winograd_bench_reports_every_shape(tmp_path):
    from sdaccel.optim.bench.winograd import format_winograd_table, run_winograd_bench

    report = run_winograd_bench("sd15", 64, repeats=1, calibration_dir=str(tmp_path), tiny=True, say=lambda s: None,
                                fused_transforms=False)  # the compiled transforms are covered by the unit test
    rows = report["rows"]
    assert {r["section"] for r in rows} == {"unet", "vae_decoder"}
    from sdaccel.optim.testing import build_components

    comps = build_components("sd15", tiny=True)
    for section, module in (("unet", comps["unet"]), ("vae_decoder", comps["vae"].decoder)):
        eligible = sum(1 for m in module.modules() if isinstance(m, torch.nn.Conv2d) and is_eligible(m))
        assert sum(r["count"] for r in rows if r["section"] == section) == eligible, section
    for row in rows:
        assert row["max_rel_err"] < 1e-4, row
        assert row["speedup"] == pytest.approx(row["conv2d_ms"] / row["winograd_ms"], rel=0.05, abs=0.01), row
    summary = report["summary"]
    for whole in ("unet_step", "vae_decode"):  # whole-module ratios are the reported times' ratio
        times = summary[f"{whole}_s"]  # (rounded to the millisecond, so compare within that rounding)
        assert abs(summary[f"{whole}_speedup"] * times["winograd"] - times["conv2d"]) <= 0.0011, (whole, times)
    assert summary["unet_output_rel_err"] < 1e-3
    assert "UNet: convs summed" in format_winograd_table(report)
    unet_only = run_winograd_bench("sd15", 64, repeats=1, calibration_dir=str(tmp_path), tiny=True,
                                   say=lambda s: None, fused_transforms=False, channels_last=True, modules=("unet",))
    assert {r["section"] for r in unet_only["rows"]} == {"unet"} and unet_only["channels_last"]
    assert "unet_step_speedup" in unet_only["summary"] and "vae_decode_speedup" not in unet_only["summary"]
    with pytest.raises(ValueError, match="--modules: unknown \\['vae'\\]"):
        run_winograd_bench("sd15", 64, modules=("vae",), tiny=True, say=lambda s: None)


@pytest.mark.parametrize("m", [2, 4])
def test_channels_last_in_channels_last_out_and_onednn_products_match(m):
    from sdaccel.cpukernels.winograd import mkldnn_linear_available, pack_filters

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 24, 14, 10, generator=g)
    weight = torch.randn(16, 24, 3, 3, generator=g) / 15
    bias = torch.randn(16, generator=g)
    ref = F.conv2d(x, weight, bias, padding=1)
    u = filter_transform(weight, m)
    xcl = x.contiguous(memory_format=torch.channels_last)
    out = winograd_conv2d(xcl, u, bias, m=m, padding=1, band_tiles=2)
    assert out.is_contiguous(memory_format=torch.channels_last) and _rel(out, ref) < BOUNDS[m]
    packed = pack_filters(u, 32)
    if mkldnn_linear_available():
        assert packed is not None
        assert _rel(winograd_conv2d(x, u, bias, m=m, padding=1, packed=packed), ref) < BOUNDS[m]
    else:
        assert packed is None


@pytest.mark.parametrize("m", [2, 4])
def test_a_reused_workspace_gives_the_same_results_in_both_modes_and_layouts(m):
    from sdaccel.cpukernels.winograd import Workspace, pack_filters

    g = torch.Generator().manual_seed(9)
    ws = Workspace()
    for (n, c, k, h, w) in [(2, 16, 8, 12, 12), (1, 8, 12, 9, 13), (2, 16, 8, 12, 12)]:  # exact, ragged, exact again
        x = torch.randn(n, c, h, w, generator=g)
        weight = torch.randn(k, c, 3, 3, generator=g) / 10
        bias = torch.randn(k, generator=g)
        ref = F.conv2d(x, weight, bias, padding=1)
        u = filter_transform(weight, m)
        for inference in (True, False):  # buffers made in inference mode must not be reused outside it
            with torch.inference_mode(inference):
                for xi in (x, x.contiguous(memory_format=torch.channels_last)):
                    for packed in (None, pack_filters(u, 16)):
                        out = winograd_conv2d(xi, u, bias, m=m, padding=1, band_tiles=2, packed=packed, workspace=ws)
                        fresh = winograd_conv2d(xi, u, bias, m=m, padding=1, band_tiles=2, packed=packed)
                        assert _rel(out, ref) < BOUNDS[m] and _rel(out, fresh) < 1e-6
    assert ws.nbytes() > 0
    ws.clear()
    assert ws.nbytes() == 0


def test_training_stays_on_conv2d_and_restore_releases_the_workspaces():
    from sdaccel.cpukernels.winograd import workspace_bytes

    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1))
    patched = patch_convs(net, _always(2), FilterCache(2**30))
    x = torch.randn(1, 4, 8, 8)
    net(x).sum().backward()  # gradients need F.conv2d: the transformed filters are detached
    assert net[0].calls == {"conv2d": 1, "winograd": 0} and net[0].weight.grad is not None
    with torch.inference_mode():
        net(x)
    assert net[0].calls["winograd"] == 1 and workspace_bytes() > 0
    patched.restore()
    assert workspace_bytes() == 0


def _fused_or_skip():
    from sdaccel.cpukernels.fused import fused_transforms_work

    if not fused_transforms_work():
        pytest.skip("the compiled Winograd transforms need a working C++ compiler (torch.compile/inductor); "
                    "the eager transforms are tested above")


@pytest.mark.slow  # inductor compiles, torch only: the Forge-pins lane (diffusers 0.31) has nothing to add here
@pytest.mark.parametrize("m", [2, 4, 6])
def test_compiled_transforms_match_conv2d_and_the_eager_path_in_both_layouts(m):
    _fused_or_skip()
    g = torch.Generator().manual_seed(m)
    # exact and ragged tiles, batch 1 and 2, no bias; one band, several, and a last band of one tile row
    for (n, c, k, h, w, pad, band, with_bias) in [(2, 16, 8, 4 * 6, 4 * 5, 1, 2, True),
                                                   (1, 8, 12, 13, 9, 1, 3, False), (2, 12, 5, 11, 17, 0, None, True)]:
        x = torch.randn(n, c, h, w, generator=g)
        weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)
        bias = torch.randn(k, generator=g) if with_bias else None
        ref = F.conv2d(x, weight, bias, padding=pad)
        u = filter_transform(weight, m)
        for xi in (x, x.contiguous(memory_format=torch.channels_last)):
            with torch.inference_mode():
                out = winograd_conv2d(xi, u, bias, m=m, padding=pad, band_tiles=band, fused=True)
                eager = winograd_conv2d(xi, u, bias, m=m, padding=pad, band_tiles=band)
            assert out.shape == ref.shape
            assert out.is_contiguous(memory_format=torch.channels_last if xi is not x else torch.contiguous_format)
            assert _rel(out, ref) < BOUNDS[m] and _rel(out, eager) < BOUNDS[m]


def test_a_failing_compiler_falls_back_to_the_eager_transforms(monkeypatch, caplog):
    """The compiler is the external edge: when it breaks at run time the layer still computes, and says so once."""
    from sdaccel.cpukernels import fused

    monkeypatch.setattr(fused, "_STATE", {"ok": True})  # as if the probe had passed; restored after the test

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(fused, "compiled_input_band", broken)
    x = torch.randn(1, 6, 10, 10)
    weight = torch.randn(4, 6, 3, 3) / 7
    with caplog.at_level("WARNING", logger="sdaccel.cpukernels.fused"):
        out = winograd_conv2d(x, filter_transform(weight, 4), None, m=4, padding=1, fused=True)
        again = winograd_conv2d(x, filter_transform(weight, 4), None, m=4, padding=1, fused=True)
    ref = F.conv2d(x, weight, padding=1)
    assert _rel(out, ref) < BOUNDS[4] and _rel(again, ref) < BOUNDS[4]
    assert not fused.fused_transforms_work()
    warnings = [r for r in caplog.records if "compiled transforms failed" in r.getMessage()]
    assert len(warnings) == 1 and "InvalidCxxCompiler" in warnings[0].getMessage()


def test_calibration_keeps_layouts_and_transform_engines_apart(tmp_path):
    from sdaccel.cpukernels.calibrate import shape_key

    keys = {shape_key(1, 8, 8, 12, 12, 1, torch.float32, torch.device("cpu"), channels_last=cl, fused=fu)
            for cl in (False, True) for fu in (False, True)}
    assert len(keys) == 4
    calib = Calibration(tmp_path, repeats=1)
    calib.timings(1, 8, 8, 12, 12, 1, torch.float32, torch.device("cpu"))
    calib.timings(1, 8, 8, 12, 12, 1, torch.float32, torch.device("cpu"), channels_last=True)
    assert calib.measured_shapes == 2 and len(json.loads(calib.path.read_text())["shapes"]) == 2
    assert Calibration(tmp_path, fused=True).tiles == (2, 4, 6) and calib.tiles == (2, 4)


def test_under_torch_compile_and_tracing_the_compiler_runs_the_convolutions():
    """A compiled model (torch.compile, or the jit trace OpenVINO converts) holds F.conv2d: the compiler picks its
    own algorithm."""
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(1, 4, 12, 12)
    with torch.inference_mode():
        ref = net(x)
    patched = patch_convs(net, _always(4), FilterCache(2**30))
    compiled = torch.compile(net, backend="eager")
    with torch.inference_mode():
        out = compiled(x)
    assert [layer.calls["winograd"] for layer in (net[0], net[2])] == [0, 0]
    assert _rel(out, ref) < 1e-6
    with torch.no_grad():
        traced = torch.jit.trace(net, x, check_trace=False)
    graph = str(traced.inlined_graph)
    assert graph.count("aten::_convolution") == 2 and "mkldnn" not in graph
    assert net[0].calls["winograd"] == 0
    with torch.no_grad():
        assert _rel(traced(x), ref) < 1e-6
    with torch.inference_mode():
        net(x)  # the same layers outside the compiled graph run Winograd
    assert net[0].calls["winograd"] == 1
    patched.restore()


def test_the_automatic_filter_budget_leaves_room_next_to_a_large_model(monkeypatch):
    """The machine's free memory is the external edge: with little left after loading, the budget shrinks."""
    from sdaccel.optim.units.winograd import unit as unit

    monkeypatch.setattr(unit, "available_memory_bytes", lambda: 64 * 2**40)
    roomy = unit.default_filter_budget_mb()
    assert 0 < roomy <= 8 * 1024  # at most 8 GiB (and 30% of RAM) however much is free
    monkeypatch.setattr(unit, "available_memory_bytes", lambda: 10 * 2**30)  # SDXL loaded on a 24 GB machine
    assert unit.default_filter_budget_mb() == min(roomy, 4096)
    monkeypatch.setattr(unit, "available_memory_bytes", lambda: None)  # not Linux: the RAM rules alone
    assert unit.default_filter_budget_mb() == roomy


@pytest.mark.parametrize("family", ["sd15", "sd21-v", "sdxl-base", "sdxl-refiner"])
def test_every_family_unet_and_vae_run_winograd_to_fp32_rounding(family, tmp_path):
    """Each architecture's UNet (SD1.x/Taiyi/SD2.x share one layout; SDXL base and refiner differ) and its VAE."""
    from sdaccel.optim.core.registry import ApplyContext, apply_all, remove_all
    from sdaccel.optim.models.families import get_family
    from sdaccel.optim.testing.random_weights import build_pipeline
    from sdaccel.optim.units.winograd.unit import WinogradConfig

    pipe = build_pipeline(family, tiny=True)
    unet, vae = pipe.unet, pipe.vae
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":
        ids = 5 if family == "sdxl-refiner" else 6
        pooled = unet.add_embedding.linear_1.in_features - ids * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=g),
                 "time_ids": torch.tensor([[128, 128, 0, 0, 128, 128][:ids]] * 2, dtype=torch.float32)}
    latent = torch.randn(1, vae.config.latent_channels, 16, 16, generator=g)

    def outputs():
        with torch.inference_mode():
            return (unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample,
                    vae.decode(latent).sample)

    plain = outputs()
    handles = apply_all(pipe, [WinogradConfig(tile="f4", calibration_dir=str(tmp_path))],
                        ApplyContext(device=torch.device("cpu"), family=get_family(family)))
    try:
        patched = outputs()
        layers = [layer for p in handles[0].info["patched"] for layer in p.adapters()]
        assert layers and {p.module for p in handles[0].info["patched"]} == {unet, vae}
        ran = [layer for layer in layers if sum(layer.calls.values())]  # the VAE encoder does not run here
        assert ran and all(layer.calls["winograd"] == sum(layer.calls.values()) for layer in ran)
    finally:
        remove_all(handles)
    for got, ref in zip(patched, plain):
        assert _rel(got, ref) < BOUNDS[4]
    assert all(type(m) is not WinogradConv2d for m in list(unet.modules()) + list(vae.modules()))
