"""CFG cutoff really halves the UNet batch; offload modes are exact, meaningful or clearly unavailable."""

from __future__ import annotations

import pytest
import torch
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec.errors import UnavailableError
from sdaccel.optim.spec.model_ref import ModelRef
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.units.offload.unit import OffloadConfig, _supports_disk_groups

REQ = GenerationRequest(prompt="a mill by a river", width=64, height=64, steps=8, seed=4, scheduler="euler")


def _spec(family="sd15", *opts):
    spec = PipelineSpec(model=ModelRef.synthetic(family, tiny=True), device="cpu")
    for cfg in opts:
        spec = spec.with_optimization(cfg)
    return spec


@pytest.mark.parametrize("family", ["sd15", "sdxl-base"])
@pytest.mark.parametrize("cutoff, step, expected_guided", [(0.5, None, 4), (0.75, None, 6), (1.0, None, 8),
                                                           (1.0, 3, 3), (0.0, None, 0)])
def test_cfg_cutoff_halves_the_unet_batch(family, cutoff, step, expected_guided, cache):
    result = run(_spec(family), REQ.with_(cfg_cutoff=cutoff, cfg_cutoff_step=step, batch_size=2), cache=cache)
    sizes = result.stats.unet_batch_sizes
    assert sizes == [4] * expected_guided + [2] * (8 - expected_guided)
    assert result.stats.cfg_steps == expected_guided


def test_cfg_cutoff_extremes_match_plain_runs(cache):
    guided = run(_spec(), REQ, cache=cache)
    assert torch.equal(run(_spec(), REQ.with_(cfg_cutoff=1.0), cache=cache).images_tensor, guided.images_tensor)
    unguided = run(_spec(), REQ.with_(cfg=1.0), cache=cache)
    assert torch.equal(run(_spec(), REQ.with_(cfg_cutoff=0.0), cache=cache).images_tensor, unguided.images_tensor)
    half = run(_spec(), REQ.with_(cfg_cutoff=0.5), cache=cache)
    assert not torch.equal(half.images_tensor, guided.images_tensor)


@pytest.mark.parametrize("mode", ["model", "sequential", "lowvram"])
def test_gpu_only_offload_modes_are_refused_on_a_cpu_or_fall_back(mode, cache):
    with pytest.raises(UnavailableError, match=f"offload.mode={mode}.*already live in system RAM"):
        run(_spec("sd15", OffloadConfig(mode=mode)), REQ, cache=cache, strict=True)
    base = run(_spec(), REQ, cache=cache)
    fallen = run(_spec("sd15", OffloadConfig(mode=mode)), REQ, cache=cache)
    assert any(f"offload.mode={mode} unavailable" in n for n in fallen.stats.notes)
    assert torch.equal(base.images_tensor, fallen.images_tensor)


def _watch_residency(pipe, log):
    """Record, at each stage start, how many weight elements each component holds in RAM."""
    def listener(event, stage):
        if event == "start":
            log.append((stage, {n: sum(p.numel() for p in getattr(pipe, n).parameters())
                                for n in ("unet", "vae", "text_encoder")}))
    return listener


def test_staged_offload_spills_idle_components_to_disk_on_a_cpu(cache, tmp_path):
    from sdaccel.optim.core.registry import RunContext

    base = run(_spec(), REQ, cache=cache)
    spec = _spec("sd15", OffloadConfig(mode="staged", spill_dir=str(tmp_path)))
    prepared = cache.prepare(spec)
    resident_before = prepared.nbytes()
    seen = []
    original_stage = RunContext.stage

    def spying_stage(self, name):
        if not any(getattr(fn, "_spy", False) for fn in self.stage_listeners):
            spy = _watch_residency(self.pipe, seen)
            spy._spy = True
            self.stage_listeners.append(spy)  # after the stager: sees what the stage runs with
        return original_stage(self, name)

    RunContext.stage = spying_stage
    try:
        staged = run(spec, REQ, cache=cache)
    finally:
        RunContext.stage = original_stage
    assert torch.equal(staged.images_tensor, base.images_tensor)  # lossless
    by_stage = dict(seen)
    assert by_stage["denoise"]["text_encoder"] == 0 and by_stage["denoise"]["vae"] == 0
    assert by_stage["decode"]["unet"] == 0 and by_stage["decode"]["vae"] > 0
    assert prepared.nbytes() < resident_before / 10  # idle: everything waits on disk
    assert list(tmp_path.glob("sdaccel-spill-*/unet.bin"))
    again = run(spec, REQ, cache=cache)  # weights come back bit for bit from the spill files
    assert torch.equal(again.images_tensor, base.images_tensor)
    restored = run(_spec(), REQ, cache=cache)  # removing the unit reads everything back and deletes the files
    assert torch.equal(restored.images_tensor, base.images_tensor)
    assert not list(tmp_path.glob("sdaccel-spill-*/*.bin"))


def test_staged_spill_rewrites_after_a_weight_change(tmp_path):
    from sdaccel.optim.testing.random_weights import build_pipeline
    from sdaccel.optim.units.offload.stores import DiskSpill

    vae = build_pipeline("sd15", tiny=True).vae
    spill = DiskSpill(vae, tmp_path / "vae.bin")
    spill.offload()
    spill.onload()
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # e.g. a LoRA or a weight edit while cached
    expected = vae.decoder.conv_out.bias.clone()
    spill.offload()
    spill.onload()
    assert torch.equal(vae.decoder.conv_out.bias, expected)
    spill.close()
    assert not (tmp_path / "vae.bin").exists()


@pytest.mark.skipif(not _supports_disk_groups(), reason="this diffusers cannot spill groups to disk")
def test_group_offload_spills_to_disk_on_a_cpu_and_is_lossless(cache, tmp_path):
    base = run(_spec(), REQ, cache=cache)
    grouped = run(_spec("sd15", OffloadConfig(mode="group", spill_dir=str(tmp_path))), REQ, cache=cache)
    torch.testing.assert_close(grouped.images_tensor, base.images_tensor, rtol=0, atol=1e-6)
    restored = run(_spec(), REQ, cache=cache)
    assert torch.equal(restored.images_tensor, base.images_tensor)


def test_model_offload_mechanics_with_cpu_onload(cache):
    """diffusers' model offload hooks, installed with the CPU as the 'accelerator', then removed exactly."""
    from sdaccel.optim.core.patching import PatchSet
    from sdaccel.optim.units.offload.unit import _enable_diffusers_offload

    base = run(_spec(), REQ, cache=cache)
    pipe = cache.entries()[-1].pipe
    patch = PatchSet("offload-mechanics")
    try:
        _enable_diffusers_offload(pipe, "model", torch.device("cpu"), patch)
    except (RuntimeError, ValueError) as exc:
        patch.remove()
        pytest.skip(f"this diffusers refuses CPU onload for model offload: {exc}")
    try:
        assert hasattr(pipe.unet, "_hf_hook")
        offloaded = run(_spec(), REQ, cache=cache)
        assert torch.equal(offloaded.images_tensor, base.images_tensor)
    finally:
        patch.remove()
    assert not hasattr(pipe.unet, "_hf_hook")
    assert torch.equal(run(_spec(), REQ, cache=cache).images_tensor, base.images_tensor)


def test_staged_spill_files_are_removed_when_the_process_ends_with_the_pipeline_prepared(tmp_path):
    """A CLI run (or Ctrl+C) ends without removing the optimization: the spilled weights must still go."""
    import subprocess
    import sys

    spill = tmp_path / "spill"
    code = f"""
from sdaccel.optim.testing import enable_synthetic
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec import GenerationRequest, PipelineSpec, ModelRef
from sdaccel.optim.units.offload import OffloadConfig
enable_synthetic()
spec = PipelineSpec(model=ModelRef.synthetic("sd15", tiny=True), device="cpu",
                    optimizations=(OffloadConfig(mode="staged", spill_dir={str(spill)!r}),))
run(spec, GenerationRequest(prompt="x", width=64, height=64, steps=1))
import os
print(sum(len(files) for _, _, files in os.walk({str(spill)!r})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip().splitlines()[-1]) >= 1  # weights were spilled while it ran
    assert spill.is_dir() and not any(spill.iterdir())  # and nothing is left after exit


def test_a_spill_dir_that_is_a_file_is_a_clear_error(tmp_path):
    from sdaccel.optim.spec.errors import ConfigError
    from sdaccel.optim.testing import build_pipeline
    from sdaccel.optim.units.offload import OffloadConfig, apply_offload

    blocker = tmp_path / "file"
    blocker.write_text("x")
    pipe = build_pipeline("sd15", tiny=True)
    with pytest.raises(ConfigError, match="OffloadConfig.spill_dir: .* is a file"):
        apply_offload(pipe, OffloadConfig(mode="staged", spill_dir=str(blocker)))
    assert blocker.read_text() == "x"
