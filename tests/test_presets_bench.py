"""Every benchmark configuration exists as a preset, and bench reports fidelity, calls and compile time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from sdaccel.optim.bench.metrics import psnr_db, ssim
from sdaccel.optim.bench.presets import PRESETS, resolve_preset
from sdaccel.optim.bench.runner import BenchSettings, format_table, run_bench, write_chart, write_json
from sdaccel.optim.spec.errors import ConfigError
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec

REQUIRED = ["baseline", "fp16", "bf16", "tf32-off", "sdpa", "sliced-attention", "sub-quadratic-attention", "xformers",
            "channels-last", "model-offload", "sequential-offload", "group-offload", "staged", "lowvram",
            "vae-fp16-fix", "tiny-vae", "vae-slicing", "vae-tiling", "freeu", "deepcache", "steps-30", "steps-25",
            "steps-20", "cfg-cutoff-50", "cfg-cutoff-75", "compile-inductor", "compile-openvino",
            "refiner-ensemble", "fastest", "under-4gb", "under-6gb", "under-8gb"]


@pytest.mark.parametrize("name", REQUIRED)
def test_every_benchmark_configuration_is_a_valid_preset(name):
    preset = PRESETS[name]
    spec, request = preset.apply(PipelineSpec.for_model("m.safetensors"), GenerationRequest(prompt="x", steps=50))
    assert preset.description
    for kind, _ in preset.optimizations:
        assert spec.optimization(kind) is not None


def test_steps_presets_scale_the_baseline_steps_and_presets_combine():
    base = GenerationRequest(prompt="x", steps=50)
    spec = PipelineSpec.for_model("m")
    assert resolve_preset("steps-30").apply(spec, base)[1].steps == 30
    assert resolve_preset("steps-20").apply(spec, base.with_(steps=10))[1].steps == 4
    combo_spec, combo_req = resolve_preset("channels-last+cfg-cutoff-75+steps-25").apply(spec, base)
    assert combo_spec.optimization("channels_last") is not None
    assert combo_req.cfg_cutoff == 0.75 and combo_req.steps == 25
    few = resolve_preset("fastest+lcm").apply(spec, base)[1]  # a fixed-step preset keeps its steps in a combo
    assert (few.steps, few.scheduler, few.cfg_cutoff) == (4, "lcm", 0.75)
    assert resolve_preset("fastest").apply(spec, base)[1].steps == 30
    swept = resolve_preset("tome:ratio=0.3+sdpa").apply(spec, base)[0]  # a sweep of one field
    assert swept.optimization("tome").ratio == 0.3 and swept.optimization("attention").backend == "sdpa"
    assert resolve_preset("tome:ratio=0.3").name == "tome:ratio=0.3"
    with pytest.raises(ConfigError, match="'speed' is not a field.*ratio"):
        resolve_preset("tome:speed=2")
    with pytest.raises(ConfigError, match="ratio"):
        resolve_preset("tome:ratio=lots")
    with pytest.raises(ConfigError, match="unknown preset 'warp-drive'"):
        resolve_preset("channels-last+warp-drive")


def test_fidelity_metrics():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(32, 32, 3, generator=g)
    assert psnr_db(image, image) == math.inf and ssim(image, image) == pytest.approx(1.0, abs=1e-6)
    shifted = (image + 0.1).clamp(0, 1)
    mse = float(((shifted - image) ** 2).mean())
    assert psnr_db(shifted, image) == pytest.approx(10 * math.log10(1 / mse))
    noise = torch.rand(32, 32, 3, generator=g)
    assert ssim(noise, image) < 0.2 < ssim(shifted, image)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    settings = BenchSettings(family="sd15", size=64, steps=4, repeats=2, warmup=1, checkpoint="synthetic-tiny:sd15",
                             presets=["baseline", "channels-last", "deepcache", "cfg-cutoff-50", "steps-25",
                                      "model-offload", "xformers", "tf32-off", "refiner-ensemble", "staged"])
    return run_bench(settings, say=lambda line: None)


def test_bench_rows_carry_fidelity_calls_and_stage_times(report):
    rows = {r["preset"]: r for r in report["rows"]}
    assert rows["baseline"]["psnr_db"] is None and rows["baseline"]["ssim"] is None
    assert rows["channels-last"].get("identical_to_baseline") or rows["channels-last"]["psnr_db"] > 60
    assert rows["deepcache"]["ssim"] is not None and rows["deepcache"]["psnr_db"] is not None
    assert rows["cfg-cutoff-50"]["unet_calls"] == 4 and rows["steps-25"]["unet_calls"] == 2
    assert rows["staged"].get("identical_to_baseline")  # staging moves weights, not numbers
    for row in (r for r in report["rows"] if "median_s" in r):
        assert set(row["stage_median_s"]) >= {"text_encode", "denoise", "decode"}
        assert row["compile_s"] == 0.0 and row["speedup"] is not None


def test_bench_skips_what_this_machine_cannot_run_with_the_reason(report):
    rows = {r["preset"]: r for r in report["rows"]}
    assert "already live in system RAM" in rows["model-offload"]["skipped"]
    assert "NVIDIA" in rows["xformers"]["skipped"] and "NVIDIA" in rows["tf32-off"]["skipped"]
    assert "needs an SDXL base" in rows["refiner-ensemble"]["skipped"]
    table = format_table(report)
    assert "skipped: " in table and "PSNR dB" in table


def test_bench_chart_and_json(report, tmp_path):
    from PIL import Image

    path = write_chart(report, tmp_path / "chart.png")
    with Image.open(path) as im:
        assert im.size[0] > 500
    written = write_json(report, tmp_path / "report.json")
    assert json.loads(Path(written).read_text()) == json.loads(json.dumps(report, default=str))
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.tmp"))


def test_refiner_ensemble_preset_runs_on_sdxl():
    settings = BenchSettings(family="sdxl-base", size=64, steps=5, repeats=1, warmup=0,
                             checkpoint="synthetic-tiny:sdxl-base", refiner="synthetic-tiny:sdxl-refiner",
                             presets=["baseline", "refiner-ensemble"])
    rows = run_bench(settings, say=lambda line: None)["rows"]
    assert rows[1]["preset"] == "refiner-ensemble" and rows[1]["unet_calls"] == 5
    assert rows[1]["ssim"] is not None
