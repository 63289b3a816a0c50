"""int8 through NNCF for the OpenVINO backend: weight-only compression and full quantization calibrated on the
pipeline's own first run, on diffusers' UNet (the pipeline unit) and on an LDM-layout UNet (the host patch)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_compile import _apply, _compiled, _ctx, _eager, _inputs, _micro_pipe
from test_native_compile import TinyLDMUnet, context, inputs, run_calls

from sdaccel.optim.core.registry import get_unit
from sdaccel.optim.native.compile import NativeCompile
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec.errors import ConfigError, SDAccelError, UnavailableError
from sdaccel.optim.spec.model_ref import ModelRef
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.units.compile import int8
from sdaccel.optim.units.compile import unit as compile_unit
from sdaccel.optim.units.compile.config import CompileConfig

needs_nncf = pytest.mark.skipif(not (compile_unit.package_available("openvino")
                                     and compile_unit.package_available("nncf")),
                                reason="pip install openvino nncf")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# ---------------------------------------------------------------- settings and availability


@pytest.mark.parametrize("fields", [{"backend": "inductor", "openvino_int8": "full"},
                                    {"backend": "openvino", "openvino_int8": "int4"}])
def test_bad_int8_settings_name_the_field(fields):
    with pytest.raises(ConfigError, match="openvino_int8"):
        CompileConfig(**fields)


def test_without_nncf_int8_is_unavailable_and_falls_back_to_float_openvino(monkeypatch):
    monkeypatch.setattr(compile_unit, "package_available", lambda name: name != "nncf")
    unit = get_unit("compile")
    cfg = CompileConfig(backend="openvino", targets="unet+vae", openvino_int8="full")
    with pytest.raises(UnavailableError, match=r"openvino_int8=full.*nncf.*pip install nncf"):
        unit.check(cfg, _ctx())
    assert unit.fallback(cfg, _ctx()) == CompileConfig(backend="openvino", targets="unet+vae")


def test_a_host_model_without_nncf_compiles_without_int8_and_says_so(monkeypatch):
    import sdaccel.optim.native.compile as native

    real = native.check_backend

    def no_nncf(cfg, device):
        if cfg.openvino_int8 != "off":
            raise UnavailableError("compile.openvino_int8=full", "the nncf package is not installed",
                                   "pip install nncf")
        real(cfg, device)

    monkeypatch.setattr(native, "check_backend", no_nncf)
    if not compile_unit.package_available("openvino"):
        pytest.skip("pip install openvino")
    state = NativeCompile(CompileConfig(backend="openvino", openvino_int8="full"))
    run_ctx = context()
    with state.run(TinyLDMUnet(), run_ctx):
        pass
    assert state.cfg.backend == "openvino" and state.cfg.openvino_int8 == "off"
    assert any("pip install nncf" in n and "without int8" in n for n in run_ctx.notes), run_ctx.notes


# ---------------------------------------------------------------- the pipeline unit (diffusers' UNet)


@needs_nncf
def test_int8_weights_quantizes_the_weights_stays_close_and_removes_exactly():
    pipe = _micro_pipe()
    unet = pipe.unet
    kwargs = _inputs(unet, 2, 16, 16)
    reference = _eager(unet, kwargs)
    handle = _apply(pipe, CompileConfig(backend="openvino", openvino_int8="weights"))
    out = _compiled(unet, kwargs)
    engine = handle.info["targets"][0].engine
    assert sum(engine.int8_ops.values()) > 0  # int8 weight constants in the compiled model
    assert 0 < _relative(out, reference) < 0.05, _relative(out, reference)  # lossy, and close
    handle.remove()
    with torch.inference_mode():
        assert torch.equal(unet(**kwargs).sample, reference)


@needs_nncf
def test_an_interrupted_calibration_run_builds_nothing_and_the_next_run_finishes_the_job():
    pipe = _micro_pipe()
    unet = pipe.unet
    first, second = _inputs(unet, 2, 16, 16, seed=1), _inputs(unet, 2, 16, 16, seed=2)
    cfg = CompileConfig(backend="openvino", openvino_int8="full")
    handle = _apply(pipe, cfg)
    unit, target = get_unit("compile"), handle.info["targets"][0]
    with pytest.raises(KeyboardInterrupt):
        with unit.run_scope(cfg, handle, context()):
            assert torch.equal(_compiled(unet, first), _eager(unet, first))  # recorded, run eager
            raise KeyboardInterrupt
    assert not target.engine.models and target.counts.calibration_calls == 1
    run_ctx = context()
    with unit.run_scope(cfg, handle, run_ctx):
        assert torch.equal(_compiled(unet, second), _eager(unet, second))
    assert len(target.engine.models) == 1 and run_ctx.counters["compile_graphs"] == 1
    assert run_ctx.counters["compile_calibration_calls"] == 1
    assert any("int8 full" in n and "operations quantized" in n for n in run_ctx.notes), run_ctx.notes
    out = _compiled(unet, first)  # now the int8 model
    assert 0 < _relative(out, _eager(unet, first)) < 0.1, _relative(out, _eager(unet, first))
    handle.remove()
    assert torch.equal(_compiled(unet, first), _eager(unet, first))


@needs_nncf
def test_a_failed_quantization_keeps_the_run_and_the_next_call_names_the_fix(monkeypatch):
    def fail(model, mode, calibration):
        raise ValueError("no int8 kernels for this model")

    monkeypatch.setattr(int8, "quantize", fail)
    pipe = _micro_pipe()
    unet = pipe.unet
    kwargs = _inputs(unet, 2, 16, 16)
    cfg = CompileConfig(backend="openvino", openvino_int8="full")
    handle = _apply(pipe, cfg)
    with get_unit("compile").run_scope(cfg, handle, context()):
        out = _compiled(unet, kwargs)
    assert torch.equal(out, _eager(unet, kwargs))  # the calibration run's output is kept
    with pytest.raises(SDAccelError, match=r"quantizing \(int8 full\).*no int8 kernels.*set openvino_int8 off"):
        _compiled(unet, kwargs)
    handle.remove()


@needs_nncf
def test_sampler_int8_full_first_run_is_exact_then_the_int8_model_is_used(cache):
    model = ModelRef.synthetic("sd15", tiny=True)
    request = GenerationRequest(prompt="a lighthouse", width=128, height=128, steps=3, seed=5, cfg=7.0)
    eager = run(PipelineSpec(model=model, device="cpu"), request, cache=cache)
    spec = PipelineSpec(model=model, device="cpu",
                        optimizations=(CompileConfig(backend="openvino", openvino_int8="full"),))
    first = run(spec, request, cache=cache)
    second = run(spec, request, cache=cache)
    assert torch.equal(first.images_tensor, eager.images_tensor)  # calibration: the UNet ran eager
    assert first.stats.counters["compile_calibration_calls"] == 3 and first.stats.counters["compile_graphs"] == 1
    assert "compile_calibration_calls" not in second.stats.counters and "compile_graphs" not in second.stats.counters
    psnr = _psnr(second.images_tensor, eager.images_tensor)
    assert 20 < psnr < math.inf, psnr  # quantized, and still the same picture (tiny random weights)


# ---------------------------------------------------------------- the host patch (LDM UNet)


@needs_nncf
def test_a_host_model_calibrates_on_its_first_run_then_runs_int8():
    torch.manual_seed(0)
    unet = TinyLDMUnet().eval()
    calls = [inputs(0, size=16), inputs(1, size=16)]
    with torch.no_grad():
        expected = [unet(*call) for call in calls]
    state = NativeCompile(CompileConfig(backend="openvino", openvino_int8="full"))
    outs, run_ctx = run_calls(state, unet, calls)
    assert all(torch.equal(o, e) for o, e in zip(outs, expected))
    assert run_ctx.counters["compile_calibration_calls"] == 2 and run_ctx.counters["compile_graphs"] == 1
    assert "compile_compiled_calls" not in run_ctx.counters
    outs, run_ctx = run_calls(state, unet, calls)
    assert run_ctx.counters["compile_compiled_calls"] == 2
    for out, ref in zip(outs, expected):
        assert 0 < _relative(out, ref) < 0.1, _relative(out, ref)


# ---------------------------------------------------------------- no usage telemetry


TELEMETRY_PROBE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from openvino_telemetry.utils import opt_in_checker
answers = []
real = opt_in_checker.OptInChecker.check
def spy(self, *args, **kwargs):
    answers.append(real(self, *args, **kwargs).name)
    return opt_in_checker.ConsentCheckResult[answers[-1]]
opt_in_checker.OptInChecker.check = spy
from test_compile import _apply, _compiled, _inputs, _micro_pipe
from sdaccel.optim.units.compile.config import CompileConfig
pipe = _micro_pipe()
handle = _apply(pipe, CompileConfig(backend="openvino", openvino_int8="weights"))
_compiled(pipe.unet, _inputs(pipe.unet, 2, 16, 16))
from openvino_telemetry import Telemetry
print(answers, Telemetry().consent, "CI" in os.environ)
"""


@needs_nncf
def test_openvino_and_nncf_send_no_telemetry_from_sdaccels_calls():
    """NNCF brings `openvino-telemetry`, which makes `import openvino`, each conversion and NNCF send usage events
    unless told not to. A fresh process (the consent is decided once per telemetry session)."""
    pytest.importorskip("openvino_telemetry")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NNCF_CI")}
    out = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE, str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    answers, consent, ci_left = out.stdout.strip().splitlines()[-1].rsplit(" ", 2)
    assert answers != "[]" and "NO_FILE" not in answers and "ACCEPTED" not in answers, answers
    assert consent == "False" and ci_left == "False"  # declined, and CI set for SDAccel's calls only
