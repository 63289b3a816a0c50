"""The bench's roofline column (counted FLOPs, measured peaks) and its optimum-intel rows (same weights, same noise)."""

from __future__ import annotations

import sys

import pytest
import torch
from sdaccel.optim.bench import peer_optimum, roofline


def test_model_flops_are_counted_on_meta_copies_and_scale_with_the_map(cache):
    from sdaccel.optim.spec.model_ref import ModelRef
    from sdaccel.optim.spec.pipeline import PipelineSpec

    pipe = cache.prepare(PipelineSpec(model=ModelRef.synthetic("sd15", tiny=True), device="cpu")).pipe
    small, large = roofline.model_flops(pipe, 64), roofline.model_flops(pipe, 128)
    assert small["unet_sample"] > 0 and small["vae_decode"] > 0
    # convolutions and linear layers scale with the pixels (4x); attention grows faster, nothing grows slower
    assert large["unet_sample"] >= 3.9 * small["unet_sample"]
    assert 3.9 * small["vae_decode"] <= large["vae_decode"] <= 4.5 * small["vae_decode"]
    assert next(pipe.unet.parameters()).device.type == "cpu"  # the real model was not touched


def test_a_3x3_convolution_counts_its_textbook_flops():
    class Conv(torch.nn.Conv2d):  # count_flops builds the model from a config, as diffusers models are built
        @classmethod
        def from_config(cls, config):
            return cls(*config)

    flops = roofline.count_flops(Conv, (8, 16, 3), lambda layer: layer(torch.zeros(2, 8, 10, 10, device="meta")))
    assert flops == 2 * 9 * 8 * 16 * 8 * 8 * 2  # no padding: 8x8 outputs


def test_peaks_are_measured_once_per_machine(tmp_path, monkeypatch):
    calls = []

    def fake(bf16):
        calls.append(bf16)
        return {"fp32": {"matmul_gflops": 100.0, "conv3x3_gflops": 120.0, "peak_gflops": 120.0}}

    monkeypatch.setattr(roofline, "measure_peaks", fake)
    first = roofline.machine_peaks(tmp_path)
    second = roofline.machine_peaks(tmp_path)
    assert first == second and len(calls) == 1
    (next(tmp_path.glob("roofline-*.json"))).write_text("{broken", encoding="utf-8")
    roofline.machine_peaks(tmp_path)  # a damaged file is measured again, not trusted
    assert len(calls) == 2


def test_roofline_columns_divide_the_full_work_by_the_stage_time():
    class Stats:
        stage_s = {"denoise": 2.0, "decode": 1.0}
        unet_batch_sizes = [2, 2, 1]  # CFG, then the cutoff halves the batch
        unet_calls = 3

    peaks = {"fp32": {"peak_gflops": 100.0}, "bf16": {"peak_gflops": 200.0}}
    cols = roofline.roofline_columns({}, [Stats()], {"unet_sample": 40e9, "vae_decode": 150e9}, peaks)
    assert cols["unet"]["gflops"] == pytest.approx(100.0)  # 5 samples x 40 GFLOP / 2 s
    assert cols["unet"]["of_fp32_peak"] == pytest.approx(1.0) and cols["unet"]["of_bf16_peak"] == pytest.approx(0.5)
    assert cols["vae"]["gflops"] == pytest.approx(150.0) and cols["vae"]["of_fp32_peak"] == pytest.approx(1.5)


def test_the_optimum_folder_reproduces_sdaccels_image_through_diffusers(cache, tmp_path):
    """The weights, scheduler and noise handed to optimum-intel are exactly what SDAccel's baseline ran."""
    from diffusers import StableDiffusionPipeline
    from sdaccel.optim.bench.metrics import psnr_db
    from sdaccel.optim.run.sampler import _plan, run
    from sdaccel.optim.spec.model_ref import ModelRef
    from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec

    spec = PipelineSpec(model=ModelRef.synthetic("sd15", tiny=True), device="cpu")
    request = GenerationRequest(prompt="a red fox", width=64, height=64, steps=3, seed=1)
    ours = run(spec, request, cache=cache).images_tensor
    prepared = cache.prepare(spec)
    plan = _plan(request, prepared.family)
    peer_optimum.write_model_folder(prepared, plan, tmp_path)
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)
    image = theirs(plan.prompt, num_inference_steps=3, guidance_scale=plan.cfg, height=64, width=64,
                   latents=torch.load(tmp_path / "latents.pt", weights_only=True), output_type="np").images
    assert psnr_db(torch.from_numpy(image), ours) > 60


def test_a_python_without_optimum_gives_a_skipped_row_that_says_how_to_fix_it(cache):
    from sdaccel.optim.bench.runner import BenchSettings
    from sdaccel.optim.run.sampler import _plan
    from sdaccel.optim.spec.model_ref import ModelRef
    from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec

    prepared = cache.prepare(PipelineSpec(model=ModelRef.synthetic("sd15", tiny=True), device="cpu"))
    plan = _plan(GenerationRequest(prompt="x", width=64, height=64, steps=1), prepared.family)
    rows = peer_optimum.run_optimum_rows(prepared, plan, BenchSettings(size=64, steps=1), None,
                                         python=sys.executable, say=lambda _: None)
    if peer_optimum.optimum_available(sys.executable) is None:
        pytest.skip("optimum-intel is installed in this venv")
    assert rows == [{"preset": "optimum-intel", "skipped": rows[0]["skipped"]}]
    assert "optimum-intel is not importable" in rows[0]["skipped"] and "--optimum-python" in rows[0]["skipped"]


def test_bench_refuses_a_bad_optimum_python_before_loading_anything(tmp_path, capsys):
    from sdaccel.optim.cli import main

    assert main(["bench", "--optimum-python", str(tmp_path / "nope")]) != 0
    assert "--optimum-python" in capsys.readouterr().err
    assert main(["bench", "--optimum", "--optimum-python", str(tmp_path / "nope")]) != 0
    assert "not an executable Python" in capsys.readouterr().err
