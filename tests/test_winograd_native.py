"""The native Winograd kernel (cpukernels/csrc/winograd.cpp): exact to fp32 rounding against F.conv2d in every
layout, tile, work split and filter mode; bad input refused with a clear error; its planner gives the filter
budget where it saves the most; and a machine where it cannot be built keeps the PyTorch Winograd."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from sdaccel.cpukernels import native
from sdaccel.cpukernels.adapter import FilterCache, WinogradConv2d, patch_convs
from sdaccel.cpukernels.calibrate import (
    Calibration,
    measure_shape,
    parse_native,
    ranked_choices,
    stored_alternative,
)
from sdaccel.cpukernels.winograd import filter_transform, native_conv2d

BOUNDS = {2: 1e-5, 4: 1e-4, 6: 2e-4}  # max |diff| / max |F.conv2d|, fp32


@pytest.fixture(scope="module")
def ops():
    found = native.native_ops()
    if found is None:  # CI and the README's machine have a compiler: a missing kernel is a failure there
        pytest.fail(f"the native Winograd kernel did not build here: {native.error()}")
    return found


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


CASES = [(1, 8, 16, 13, 11, 1), (2, 32, 24, 9, 17, 0), (3, 130, 70, 7, 5, 1), (2, 64, 100, 40, 3, 1),
         (1, 3, 5, 6, 6, 1), (2, 66, 34, 3, 3, 0)]


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("n, c, k, h, w, pad", CASES)
def test_every_split_layout_and_filter_mode_matches_conv2d(ops, m, n, c, k, h, w, pad):
    g = torch.Generator().manual_seed(m * 1000 + c)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)
    bias = torch.randn(k, generator=g)
    ref = F.conv2d(x, weight, bias, padding=pad)
    kept = ops.transform_filters(weight, m, False)
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        for filters in (kept, weight, weight.contiguous(memory_format=torch.channels_last)):
            for block in (1, 5, 64, -7, -16, -64):
                out = native_conv2d(xin, filters, bias, m=m, padding=pad, block=block)
                assert out.shape == ref.shape
                assert _rel(out, ref) < BOUNDS[m], (xin.stride(), tuple(filters.shape), block)
                # the output keeps the input's memory layout (a 1x1 map is both layouts at once)
                if out.shape[-1] * out.shape[-2] > 1:
                    assert out.is_contiguous(memory_format=torch.channels_last) == xin.is_contiguous(
                        memory_format=torch.channels_last)


@pytest.mark.parametrize("m", [2, 4, 6])
def test_kept_filters_equal_the_pytorch_transform(ops, m):
    weight = torch.randn(20, 12, 3, 3)
    kept = ops.transform_filters(weight, m, False)  # [A*A, C, K]
    torch.testing.assert_close(kept, filter_transform(weight, m).transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_no_bias_and_strided_input_views(ops):
    x = torch.randn(2, 16, 20, 20)[:, :, 2:14, 3:17]  # a non-contiguous view: copied, same result
    weight = torch.randn(8, 16, 3, 3) * 0.1
    out = native_conv2d(x, weight, None, m=4, padding=1, block=16)
    assert _rel(out, F.conv2d(x, weight, padding=1)) < BOUNDS[4]


@pytest.mark.parametrize("m", [2, 4])
def test_bf16_products_stay_close_and_report_their_error(ops, m):
    """bf16 products (fp32 transforms): the error grows with the tile (the transforms amplify the rounding)."""
    if not native.bf16_products():
        pytest.skip("this CPU has no native bf16 products (AVX-512 BF16 / AMX)")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, 16, 16, generator=g)
    weight = torch.randn(32, 64, 3, 3, generator=g) / 24
    ref = F.conv2d(x, weight, padding=1)
    for filters in (ops.transform_filters(weight, m, True), weight):
        for by_channels in (False, True):
            out = ops.conv2d(x, filters, None, m, 1, 16, True, by_channels)
            err = _rel(out, ref)
            assert err < {2: 1e-2, 4: 8e-2}[m]
            assert err > 1e-5  # really bf16: the products lost digits


def test_bad_input_gets_a_clear_error(ops):
    x = torch.randn(1, 8, 10, 10)
    w = torch.randn(4, 8, 3, 3)
    with pytest.raises(RuntimeError, match="tile m must be 2, 4 or 6"):
        ops.conv2d(x, w, None, 3, 1, 16, False, False)
    with pytest.raises(RuntimeError, match="padding must be 0 or 1"):
        ops.conv2d(x, w, None, 4, 2, 16, False, False)
    with pytest.raises(RuntimeError, match="float32"):
        ops.conv2d(x.double(), w, None, 4, 1, 16, False, False)
    with pytest.raises(RuntimeError, match=r"weight must be float32 \[K, 8, 3, 3\]"):
        ops.conv2d(x, torch.randn(4, 7, 3, 3), None, 4, 1, 16, False, False)
    with pytest.raises(RuntimeError, match="do not match"):
        ops.conv2d(x, ops.transform_filters(w, 2, False), None, 4, 1, 16, False, False)
    with pytest.raises(RuntimeError, match="bias has 3 values for 4 channels"):
        ops.conv2d(x, w, torch.zeros(3), 4, 1, 16, False, False)
    with pytest.raises(RuntimeError, match="smaller than the filter"):
        ops.conv2d(torch.randn(1, 8, 1, 1), w, None, 4, 0, 16, False, False)
    with pytest.raises(RuntimeError, match="even channel count"):
        ops.transform_filters(torch.randn(4, 7, 3, 3), 4, True)


def test_scratch_is_kept_between_calls_and_released(ops):
    x = torch.randn(2, 64, 24, 24)
    w = torch.randn(64, 64, 3, 3)
    with torch.inference_mode():
        native_conv2d(x, w, None, m=4, padding=1, block=-32)
    assert native.scratch_bytes() > 0
    native.release_scratch()
    assert native.scratch_bytes() == 0
    with torch.inference_mode():  # and it works again afterwards
        assert _rel(native_conv2d(x, w, None, m=4, padding=1, block=8), F.conv2d(x, w, padding=1)) < BOUNDS[4]


def test_the_build_is_keyed_to_source_torch_and_cpu(ops, monkeypatch):
    key = native.build_key()
    assert native.build_dir().name == key and native.is_built()
    monkeypatch.setattr(native, "_cpu_signature", lambda: "another cpu|avx2")
    assert native.build_key() != key  # code built for another CPU is never loaded


def test_native_calibration_names_rank_and_offer_kept_filters(ops, tmp_path):
    timings = measure_shape(2, 64, 64, 16, 16, 1, repeats=1, native=True)
    assert "conv2d" in timings
    natives = [name for name in timings if parse_native(name)]
    assert {parse_native(n)[0] for n in natives} == {2, 4}  # a 16x16 map: F(2,3) and F(4,3)
    assert any(name.endswith("s") for name in natives)
    for kind, m, block in ranked_choices(timings)[:-1]:
        assert kind == "native" and m in (2, 4) and block != 0
    fake = {"conv2d": 1.0, "n4k32": 0.5, "n4t32": 0.6, "n4k32s": 0.4, "n2k16": 0.7, "n2k16s": 0.3}
    assert ranked_choices(fake)[0] == ("native", 4, -32)  # ranked on the fly; kept entries are no choices
    saving, kept = stored_alternative(fake, ("native", 4, -32))
    assert saving == pytest.approx(0.2) and kept == ("native", 2, -16)
    assert stored_alternative({"conv2d": 1.0, "n4k32": 0.5, "n4k32s": 0.6}, ("native", 4, -32)) is None
    table = Calibration(tmp_path, native=True)
    assert not table.known(2, 64, 64, 16, 16, 1, torch.float32, "cpu")
    table.timings(2, 64, 64, 16, 16, 1, torch.float32, "cpu")
    assert table.known(2, 64, 64, 16, 16, 1, torch.float32, "cpu")
    assert not Calibration(tmp_path).known(2, 64, 64, 16, 16, 1, torch.float32, "cpu")  # engines kept apart


class _Planner:
    """A planner that always answers one native choice (the unit's is tested through the pipeline)."""

    fused = False

    def __init__(self, m, block):
        self.choice = ("native", m, block)

    def __call__(self, layer, x):
        return self.choice


def test_layers_run_on_the_fly_until_they_hold_room_and_follow_weight_changes(ops):
    cache = FilterCache(2**30)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.Conv2d(12, 8, 3, padding=1))
    patched = patch_convs(net, _Planner(4, -8), cache)
    x = torch.randn(2, 8, 12, 12)
    with torch.inference_mode():
        ref = F.conv2d(F.conv2d(x, net[0].weight, net[0].bias, padding=1), net[1].weight, net[1].bias, padding=1)
        assert _rel(net(x), ref) < 1e-4
        assert cache.used == 0  # on the fly: nothing kept
        assert all(layer.reserve(4) for layer in net)
        assert _rel(net(x), ref) < 1e-4
        assert cache.used == 36 * (8 * 12 + 12 * 8) * 4
        net[0].weight.add_(0.25)  # a LoRA patching in place: the kept filters are remade
        ref2 = F.conv2d(F.conv2d(x, net[0].weight, net[0].bias, padding=1), net[1].weight, net[1].bias, padding=1)
        assert _rel(net(x), ref2) < 1e-4
    assert [layer.calls["winograd"] for layer in net] == [3, 3]
    patched.restore()
    assert cache.used == 0 and all(type(layer) is torch.nn.Conv2d for layer in net)


def test_the_planner_gives_the_budget_to_the_most_time_per_mb(ops, tmp_path):
    from sdaccel.optim.units.winograd.unit import WinogradConfig, WinogradPlanner

    planner = WinogradPlanner(WinogradConfig(), str(tmp_path))
    assert planner.native
    cache = FilterCache(36 * 16 * 16 * 4)  # room for exactly one of the two small layers below
    small = WinogradConv2d(torch.nn.Conv2d(16, 16, 3, padding=1), planner, cache)
    other = WinogradConv2d(torch.nn.Conv2d(16, 16, 3, padding=1), planner, cache)
    planner.storage = [(0.001, 36 * 16 * 16 * 4, small, "a", ("native", 4, -16)),
                       (0.004, 36 * 16 * 16 * 4, other, "b", ("native", 4, -16))]
    assert planner.allocate_storage() == 1
    assert 4 in other._filters.reserved and 4 not in small._filters.reserved
    assert planner.memo == {"b": ("native", 4, -16)} and planner.storage == []


def test_a_machine_without_the_native_kernel_keeps_the_pytorch_winograd(monkeypatch, tmp_path):
    from sdaccel.optim.units.winograd.unit import WinogradConfig, WinogradPlanner

    monkeypatch.setattr(native, "native_ops", lambda build=True: None)
    monkeypatch.setattr(native, "error", lambda: "no C++ compiler found")
    planner = WinogradPlanner(WinogradConfig(fused_transforms=False, tile="f4"), str(tmp_path))
    assert not planner.native
    layer = WinogradConv2d(torch.nn.Conv2d(8, 8, 3, padding=1), planner, FilterCache(2**30))
    x = torch.randn(1, 8, 16, 16)
    with torch.inference_mode():
        out = layer(x)
    assert planner.memo and next(iter(planner.memo.values())) == ("winograd", 4, 0)
    assert _rel(out, F.conv2d(x, layer.weight, layer.bias, padding=1)) < 1e-4
    pytorch_only = WinogradPlanner(WinogradConfig(kernel="pytorch"), str(tmp_path))
    monkeypatch.undo()
    assert not pytorch_only.native  # asked for, whatever the machine


def test_unavailable_reason_names_the_missing_tool(monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert "C++ compiler" in native.unavailable_reason()


def test_a_lock_left_by_a_killed_build_never_blocks_loading(ops, tmp_path):
    """A host killed during its first build leaves torch's lock file behind; the finished build must still load
    at once (torch's own builder would wait on that lock forever)."""
    built = native.build_dir()
    copy = tmp_path / "native" / built.name
    shutil.copytree(built, copy)
    (copy / "lock").write_text("", encoding="utf-8")
    stale = tmp_path / "native" / f".{built.name}.build-1-2"
    stale.mkdir()
    code = ("import sdaccel.cpukernels.native as n; ops = n.native_ops(build=False); "
            "print(ops is not None, n.is_built())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SDACCEL_NATIVE_DIR": str(tmp_path / "native")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["True", "True"]
    native._remove_stale_builds(tmp_path / "native")
    assert stale.exists()  # fresh: maybe another process's build in progress
    old = time.time() - native.STALE_BUILD_S - 60
    os.utime(stale, (old, old))
    native._remove_stale_builds(tmp_path / "native")
    assert not stale.exists() and copy.exists()


@pytest.mark.slow  # a profiled module run, torch only: nothing for the Forge-pins lane to add
def test_bench_profile_shows_where_each_kernel_spends_the_module_time(ops, tmp_path):
    from sdaccel.optim.bench.winograd import format_winograd_table, run_winograd_bench

    report = run_winograd_bench("sd15", 64, repeats=1, calibration_dir=str(tmp_path), tiny=True, say=lambda s: None,
                                modules=("unet",), compare_pytorch=True, profile=True)
    variants = report["summary"]["profile"]["unet"]
    assert set(variants) == {"conv2d", "native winograd", "pytorch winograd"}
    ops_of = {name: [op["op"] for op in found] for name, found in variants.items()}
    assert any("sdaccel_winograd::conv2d" == op for op in ops_of["native winograd"]), ops_of
    assert not any(op.startswith("sdaccel_winograd::") for op in ops_of["conv2d"] + ops_of["pytorch winograd"])
    for found in variants.values():
        shares = [op["share"] for op in found]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001
    assert "profile unet, native winograd: " in format_winograd_table(report)
