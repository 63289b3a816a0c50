"""The native compile patch (optim/native/compile.py) on a small module in the LDM UNet layout, host-free.

What ComfyUI's own UNetModel does with it is checked in the real host (comfy_native_check.py and
test_comfy_model_patches.py); here: the same output as the plain forward, the reasons a call runs eager, a
recompile after a weight change, a failing compiler that leaves the run eager with a note, and bad settings.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from sdaccel.optim.core.registry import RunContext
from sdaccel.optim.native.compile import NativeCompile
from sdaccel.optim.native.deepcache import LDMDeepCache
from sdaccel.optim.run.capabilities import package_available
from sdaccel.optim.spec.errors import ConfigError, UnavailableError
from sdaccel.optim.units.compile.config import CompileConfig
from sdaccel.optim.units.deepcache.config import DeepCacheConfig

needs_openvino = pytest.mark.skipif(not package_available("openvino"), reason="pip install openvino")


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def forward(self, x):
        return nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")


class TinyLDMUnet(nn.Module):
    """input_blocks / middle_block / output_blocks as the LDM UNet has them, a `_forward` with its signature."""

    def __init__(self, ch: int = 8, ctx_dim: int = 16):
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, ch, 3, padding=1)),
                                           nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1)),
                                           nn.Sequential(Downsample(ch))])
        self.middle_block = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1))
        self.output_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(2 * ch, ch, 3, padding=1), Upsample()),
                                            nn.Sequential(nn.Conv2d(2 * ch, ch, 3, padding=1)),
                                            nn.Sequential(nn.Conv2d(2 * ch, ch, 3, padding=1))])
        self.context_proj = nn.Linear(ctx_dim, ch)
        self.out = nn.Conv2d(ch, 4, 3, padding=1)

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return self._forward(x, timesteps, context, y, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        emb = self.context_proj(context).mean(1)[:, :, None, None] + timesteps[:, None, None, None] * 1e-3
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h) + emb if block is self.input_blocks[0] else block(h)
            hs.append(h)
        h = self.middle_block(h)
        if control is not None:
            h = h + control
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1))
        return self.out(h)


def inputs(seed: int = 0, size: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, size, size, generator=gen), torch.tensor([500.0, 500.0]),
            torch.randn(2, 5, 16, generator=gen))


def context():
    return RunContext(pipe=None, family=None, device="cpu", steps=2, batch=2, cfg_steps=2)


def run_calls(state, unet, calls, **options):
    """Each call through the patch as a host wrapper would make it; the outputs and the run's report."""
    run = context()
    outs = []
    with torch.no_grad(), state.run(unet, run):
        for x, t, ctx in calls:
            def eager(x=x, t=t, ctx=ctx):
                return unet(x, t, ctx, None, options.get("control"), options.get("transformer_options", {}))

            outs.append(state.call(eager, run, x, t, ctx, None, options.get("control"),
                                   options.get("transformer_options", {})))
    return outs, run


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return TinyLDMUnet().eval()


@needs_openvino
def test_openvino_gives_the_plain_forward_and_converts_once_for_all_sizes(unet):
    state = NativeCompile(CompileConfig(backend="openvino", dynamic=True))
    calls = [inputs(0), inputs(1), inputs(2, size=16)]
    with torch.no_grad():
        expected = [unet(*call) for call in calls]
    outs, run = run_calls(state, unet, calls)
    for out, ref in zip(outs, expected):
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    assert run.counters["compile_compiled_calls"] == 3 and run.counters["compile_graphs"] == 1
    assert "compile_eager_calls" not in run.counters
    again, run = run_calls(state, unet, calls[:1])  # the next run reuses the graph
    assert torch.equal(again[0], outs[0]) and "compile_graphs" not in run.counters


@needs_openvino
@pytest.mark.parametrize("loaded", ["normally", "under inference_mode"])
def test_a_weight_change_recompiles_with_the_new_weights(loaded):
    """ComfyUI loads (and patches) weights under inference_mode: tensors with no version counter."""
    torch.manual_seed(0)
    with torch.inference_mode(loaded != "normally"):
        unet = TinyLDMUnet().eval()
    state = NativeCompile(CompileConfig(backend="openvino", dynamic=True))
    call = inputs(0)
    before, _ = run_calls(state, unet, [call])
    with torch.inference_mode():
        unet.out.weight.mul_(1.5)  # a LoRA patched in place
        expected = unet(*call)
    after, run = run_calls(state, unet, [call])
    assert run.counters["compile_rebuilds"] == 1 and any("recompiled" in n for n in run.notes)
    assert float((after[0] - expected).abs().max() / expected.abs().max()) < 1e-5
    assert not torch.allclose(after[0], before[0])


@needs_openvino
def test_on_weight_change_error_stops_the_run_with_the_fix(unet):
    state = NativeCompile(CompileConfig(backend="openvino", on_weight_change="error"))
    run_calls(state, unet, [inputs(0)])
    with torch.no_grad():
        unet.out.weight.add_(0.1)
    with pytest.raises(Exception, match="on_weight_change=recompile"):
        run_calls(state, unet, [inputs(0)])


@needs_openvino
@pytest.mark.parametrize("why, options, said", [
    ("control", {"control": torch.zeros(2, 8, 4, 4)}, "ControlNet"),
    ("patches", {"transformer_options": {"patches": {"attn2_patch": [lambda *a: a]}}}, "patches the UNet"),
])
def test_calls_a_graph_cannot_hold_run_the_host_forward_and_say_why(unet, why, options, said):
    state = NativeCompile(CompileConfig(backend="openvino"))
    call = inputs(0)
    with torch.no_grad():
        expected = unet(*call, None, options.get("control"), options.get("transformer_options", {}))
    outs, run = run_calls(state, unet, [call], **options)
    assert torch.equal(outs[0], expected)
    assert run.counters["compile_eager_calls"] == 1 and "compile_graphs" not in run.counters
    assert any(said in note for note in run.notes), run.notes


@needs_openvino
def test_deepcache_running_on_the_same_unet_keeps_calls_eager(unet):
    state = NativeCompile(CompileConfig(backend="openvino"))
    cache = LDMDeepCache(unet, DeepCacheConfig(cache_interval=2, cache_branch_id=0))
    cache.install()
    try:
        _, run = run_calls(state, unet, [inputs(0)])
    finally:
        cache.uninstall()
    assert run.counters["compile_eager_calls"] == 1 and any("DeepCache" in n for n in run.notes), run.notes
    _, run = run_calls(state, unet, [inputs(0)])  # DeepCache gone: compiled again
    assert run.counters["compile_compiled_calls"] == 1


class Engine:
    """A compile engine that raises `error` when called."""

    def __init__(self, error: BaseException):
        self.error = error

    def __call__(self, target, bound):
        raise self.error

    def reset(self):
        pass


def test_a_failing_compiler_runs_eager_with_a_note_for_this_and_later_runs(unet, monkeypatch):
    state = NativeCompile(CompileConfig(backend="openvino" if package_available("openvino") else "inductor"))
    call = inputs(0)
    with torch.no_grad():
        expected = unet(*call)
    run = context()
    with torch.no_grad(), state.run(unet, run):
        monkeypatch.setattr(state.target, "engine", Engine(RuntimeError("the compiler crashed")))
        out = state.call(lambda: unet(*call), run, *call, None, None, {})
    assert torch.equal(out, expected) and run.counters["compile_failures"] == 1
    assert any("the compiler crashed" in note and "eager" in note for note in run.notes), run.notes
    monkeypatch.undo()
    outs, run = run_calls(state, unet, [call])  # later runs stay eager and say so
    assert torch.equal(outs[0], expected) and any("failed" in note for note in run.notes)


def test_an_interrupt_from_the_host_is_not_taken_for_a_compile_failure(unet, monkeypatch):
    class HostInterrupt(Exception):
        pass

    state = NativeCompile(CompileConfig(backend="openvino" if package_available("openvino") else "inductor"),
                          passthrough=(HostInterrupt,))
    run = context()
    with torch.no_grad(), state.run(unet, run):
        monkeypatch.setattr(state.target, "engine", Engine(HostInterrupt()))
        with pytest.raises(HostInterrupt):
            state.call(lambda: None, run, *inputs(0), None, None, {})
    assert not state.failed


def test_a_missing_compiler_falls_back_to_the_other_and_says_so(unet, monkeypatch):
    import sdaccel.optim.native.compile as native

    def only_inductor(cfg, device):
        if cfg.backend == "openvino":
            raise UnavailableError("compile.backend=openvino", "the openvino package is not installed",
                                   "pip install openvino")

    monkeypatch.setattr(native, "check_backend", only_inductor)
    state = NativeCompile(CompileConfig(backend="openvino"))
    run = context()
    with state.run(unet, run):
        pass
    assert state.cfg.backend == "inductor" and state.cfg.freezing
    assert any("pip install openvino" in n and "inductor instead" in n for n in run.notes), run.notes


def test_settings_a_host_model_cannot_take_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="openvino or inductor"):
        NativeCompile(CompileConfig(backend="tensorrt"))
    with pytest.raises(ConfigError, match="granularity"):
        NativeCompile(CompileConfig(backend="inductor", granularity="blocks"))
    with pytest.raises(UnavailableError, match="input_blocks"):
        with NativeCompile(CompileConfig(backend="openvino")).run(nn.Linear(2, 2), context()):
            pass


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None, reason="inductor needs a C++ "
                    "compiler on a CPU")
def test_inductor_with_frozen_weights_gives_the_plain_forward_and_recompiles_on_a_weight_change(unet):
    state = NativeCompile(CompileConfig(backend="inductor", freezing=True))
    call = inputs(0)
    with torch.no_grad():
        expected = unet(*call)
    outs, run = run_calls(state, unet, [call, call])
    assert run.counters["compile_compiled_calls"] == 2 and run.counters["compile_graphs"] >= 1
    assert float((outs[0] - expected).abs().max() / expected.abs().max()) < 1e-5
    with torch.no_grad():
        unet.out.weight.mul_(0.5)  # frozen weights are constants in the graph: this must recompile
        expected = unet(*call)
    outs, run = run_calls(state, unet, [call])
    assert run.counters["compile_rebuilds"] == 1
    assert float((outs[0] - expected).abs().max() / expected.abs().max()) < 1e-5
