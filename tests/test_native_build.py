"""The native Winograd kernel is built in the background, once per machine: a sampling run never waits for it.

The build process (cpukernels/native_build.py) holds a lock file, so two processes build once, and renames a
complete build into place, so nobody loads half of one; a killed build leaves nothing that blocks the next. While
it runs, the engine pipeline and the host-native patch run their layers on F.conv2d with a note, and the first run
after it finishes uses the kernel. The compile itself is replaced here by a copy of the real library (the real
build is covered by test_winograd_native.py); everything around it is real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sdaccel.cpukernels import native

CPUKERNELS = Path(native.__file__).parent

# a build process whose compile waits for `<folder>.go` (or gives up after 120 s), then copies `library` in
FAKE_BUILD = textwrap.dedent("""
    import json, os, shutil, sys, time
    from pathlib import Path
    sys.path.insert(0, {cpukernels!r})
    import native_build  # as a script: the standard library only

    spec, library, record = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

    def fake_compile(spec, private):
        with open(record, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")
        go = Path(spec["folder"] + ".go")
        deadline = time.time() + 120
        while not go.exists() and time.time() < deadline:
            time.sleep(0.05)
        (private / "half-written.o").write_text("")
        if go.exists():
            shutil.copy(library, private / library.name)

    print(native_build.install(spec, fake_compile))
""")


@pytest.fixture(scope="module")
def real_library():
    if native.native_ops() is None:  # CI and the README's machine have a compiler: a missing kernel is a failure
        pytest.fail(f"the native Winograd kernel did not build here: {native.error()}")
    return native._library(native.build_dir())


def _script(tmp_path) -> Path:
    path = tmp_path / "fake_build.py"
    path.write_text(FAKE_BUILD.format(cpukernels=str(CPUKERNELS)), encoding="utf-8")
    return path


def _spec(tmp_path) -> dict:
    return {"name": "sdaccel_winograd_test", "source": "unused", "cflags": [], "ldflags": [],
            "folder": str(tmp_path / "native" / "key")}


def _wait(predicate, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _build_command(real_library, tmp_path):
    """(the final build folder, the file each compile is recorded in, the command of one building process)."""
    spec, record = _spec(tmp_path), tmp_path / "compiles"
    command = [sys.executable, str(_script(tmp_path)), json.dumps(spec), str(real_library), str(record)]
    return Path(spec["folder"]), record, command


def test_two_processes_build_once_and_nobody_sees_half_a_build(real_library, tmp_path):
    folder, record, command = _build_command(real_library, tmp_path)
    first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    _wait(record.exists)
    second = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)  # waits on the lock file
    time.sleep(1.0)
    assert not folder.exists()  # a build in progress is in a private folder: the final one is absent or whole
    assert list(folder.parent.glob(".key.build-*"))
    Path(str(folder) + ".go").write_text("")
    outputs = [first.communicate(timeout=60)[0].split(), second.communicate(timeout=60)[0].split()]
    assert sorted(outputs) == [["False"], ["True"]]  # one built, the other found it built
    assert len(record.read_text().splitlines()) == 1
    assert native_build_library(folder) == folder / real_library.name
    assert not list(folder.parent.glob(".key.build-*"))


def native_build_library(folder):
    from sdaccel.cpukernels.native_build import library_in

    return library_in(folder)


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_a_killed_build_leaves_nothing_that_blocks_the_next(real_library, tmp_path):
    folder, record, command = _build_command(real_library, tmp_path)
    killed = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    _wait(record.exists)
    killed.send_signal(signal.SIGKILL)  # a host killed mid-build: its OS lock goes with it
    killed.wait(timeout=30)
    assert list(folder.parent.glob(".key.build-*")) and not folder.exists()
    Path(str(folder) + ".go").write_text("")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True"], done.stderr[-2000:]
    assert native_build_library(folder) is not None and not list(folder.parent.glob(".key.build-*"))


@pytest.fixture
def cold_kernel(real_library, tmp_path, monkeypatch):
    """An empty kernel folder, a fresh process state and a background build that finishes once `<folder>.go`
    exists. The real library stays loaded (it was loaded above), so `load_library` has nothing to do."""
    script, record = _script(tmp_path), tmp_path / "compiles"
    monkeypatch.setenv("SDACCEL_NATIVE_DIR", str(tmp_path / "native"))
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setattr(native, "_BUILD", {})
    monkeypatch.setattr(native, "_build_command",
                        lambda spec: [sys.executable, str(script), json.dumps(spec), str(real_library), str(record)])
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)

    def let_the_build_finish():  # the build thread may not have made the folder yet on a busy machine
        native.build_dir().parent.mkdir(parents=True, exist_ok=True)
        Path(str(native.build_dir()) + ".go").write_text("")

    yield let_the_build_finish
    thread = native._BUILD.get("thread")
    if thread is not None:
        thread.join(timeout=120)
    assert len(record.read_text().splitlines()) == 1 and len(loaded) == 1  # built and loaded once


def test_a_first_engine_run_does_not_wait_for_the_build_and_the_next_uses_it(cold_kernel, cache, tmp_path):
    from sdaccel.optim.run.sampler import run
    from sdaccel.optim.spec.errors import GenerationInterrupted
    from sdaccel.optim.spec.model_ref import ModelRef
    from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
    from sdaccel.optim.units.winograd.unit import WinogradConfig

    spec = PipelineSpec(model=ModelRef.synthetic("sd15", tiny=True), device="cpu")
    req = GenerationRequest(prompt="a barn", width=64, height=64, steps=2, seed=3)
    base = run(spec, req, cache=cache)
    wspec = spec.with_optimization(WinogradConfig(tile="f4", vae=False, calibration_dir=str(tmp_path)))
    with pytest.raises(GenerationInterrupted):  # honoured at once: nothing waits for the build
        run(wspec, req, cache=cache, should_interrupt=lambda: True)
    first = run(wspec, req, cache=cache)  # the build cannot finish before the go file: waiting would hang here
    assert native.building() and not native.is_built()
    counters = first.stats.counters
    assert counters["winograd_native_kernel"] == 0 and counters["winograd_native_building"] == 1
    assert counters.get("winograd_calls", 0) == 0 and counters["winograd_conv2d_calls"] > 0
    assert any("native kernel building in the background" in note for note in first.stats.notes)
    assert torch.equal(first.images_tensor, base.images_tensor)  # F.conv2d: the un-patched image exactly
    cold_kernel()
    _wait(lambda: not native.building())
    assert native.is_built() and native.build_seconds() is not None
    second = run(wspec, req, cache=cache)
    counters = second.stats.counters
    assert counters["winograd_native_kernel"] == 1 and counters["winograd_calls"] > 0
    assert "winograd_native_building" not in counters
    assert any("finished building in the background" in note for note in second.stats.notes)
    torch.testing.assert_close(second.images_tensor, base.images_tensor, rtol=0, atol=2e-4)


def test_the_host_native_patch_takes_the_same_path(cold_kernel, tmp_path):
    from test_native_compile import TinyLDMUnet, context, inputs

    from sdaccel.optim.native.winograd import NativeWinograd, winograd_summary
    from sdaccel.optim.units.winograd.unit import WinogradConfig

    torch.manual_seed(0)
    unet = TinyLDMUnet().eval()
    state = NativeWinograd(WinogradConfig(tile="f4", calibration_dir=str(tmp_path)))
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = unet(x, t, ctx)
        outs = []
        for _ in range(2):
            run = context()
            with state.run(unet, run):
                outs.append(unet(x, t, ctx))
            if not outs[1:]:
                assert run.counters["winograd_native_building"] == 1 and run.counters["winograd_winograd_calls"] == 0
                assert "F.conv2d while the native kernel builds" in winograd_summary(run.counters)[0]
                assert any("building in the background" in note for note in run.notes)
                cold_kernel()
                _wait(lambda: not native.building())
    assert torch.equal(outs[0], ref)
    assert run.counters["winograd_native_kernel"] == 1 and run.counters["winograd_winograd_calls"] > 0
    torch.testing.assert_close(outs[1], ref, rtol=0, atol=1e-4)


def test_a_failed_background_build_leaves_the_pytorch_winograd_with_the_reason(tmp_path, monkeypatch):
    from sdaccel.cpukernels.adapter import FilterCache, WinogradConv2d
    from sdaccel.optim.core.registry import RunContext
    from sdaccel.optim.units.winograd.unit import WinogradConfig, WinogradPlanner

    monkeypatch.setenv("SDACCEL_NATIVE_DIR", str(tmp_path / "native"))
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setattr(native, "_BUILD", {})
    monkeypatch.setattr(native, "unavailable_reason", lambda: None)
    monkeypatch.setattr(native, "_build_command",
                        lambda spec: [sys.executable, "-c", "import sys; print('error: no space left'); sys.exit(1)"])
    planner = WinogradPlanner(WinogradConfig(tile="f4", fused_transforms=False), str(tmp_path))
    layer = WinogradConv2d(torch.nn.Conv2d(8, 8, 3, padding=1), planner, FilterCache(2**30))
    x = torch.randn(1, 8, 16, 16)
    run = RunContext(pipe=None, family=None, device="cpu", steps=1, batch=1, cfg_steps=1)
    planner.start_run(run)
    assert planner.building
    with torch.inference_mode():
        layer(x)
    assert list(planner.memo.values()) == [("conv2d", 0, 0)]  # while it builds
    native._BUILD["thread"].join(timeout=60)
    planner.start_run(run)
    assert not planner.native and not planner.building
    with torch.inference_mode():
        out = layer(x)
    assert list(planner.memo.values()) == [("winograd", 4, 0)]  # the plan starts over, on the PyTorch Winograd
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1),
                               rtol=0, atol=1e-4)
    assert "no space left" in native.error() and "full log in" in native.error()
    assert any("native kernel unavailable" in note and "no space left" in note for note in run.notes)
