"""The prepared-pipeline cache loads once, applies once, reconfigures in memory and stays bounded."""

from __future__ import annotations

import pytest
import torch
from sdaccel.optim.models import loader as loader_module
from sdaccel.optim.run.cache import PipelineCache
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec.errors import UnavailableError
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.units.channels_last.unit import ChannelsLastConfig
from sdaccel.optim.units.precision.unit import PrecisionConfig

REQUEST = GenerationRequest(prompt="a cat", width=64, height=64, steps=2, seed=5)


@pytest.fixture
def disk_reads(monkeypatch):
    """Count how often a checkpoint file is opened from disk."""
    reads = []
    real = loader_module.open_checkpoint

    def counting(path):
        reads.append(str(path))
        return real(path)

    monkeypatch.setattr(loader_module, "open_checkpoint", counting)
    return reads


def test_same_spec_twice_loads_and_applies_once(checkpoints, cache, disk_reads):
    spec = PipelineSpec(model=checkpoints.get("sd15")).with_optimization(ChannelsLastConfig())
    first = run(spec, REQUEST, cache=cache)
    second = run(spec, REQUEST, cache=cache)
    assert (cache.loads, cache.applies, len(disk_reads)) == (1, 1, 1)
    assert first.stats.cache == "loaded" and second.stats.cache == "hit"
    assert torch.equal(first.images_tensor, second.images_tensor)


def test_per_run_settings_reload_nothing(checkpoints, cache, disk_reads):
    spec = PipelineSpec(model=checkpoints.get("sd15"))
    run(spec, REQUEST, cache=cache)
    for change in ({"steps": 3}, {"seed": 9}, {"cfg": 1.0}, {"width": 72}, {"scheduler": "euler_a"},
                   {"batch_size": 2}, {"negative_prompt": "dark"}):
        result = run(spec, REQUEST.with_(**change), cache=cache)
        assert result.stats.cache == "hit", change
    assert (cache.loads, cache.applies, len(disk_reads)) == (1, 1, 1)


def test_structural_toggle_change_reconfigures_without_reading_the_disk(checkpoints, cache, disk_reads):
    spec = PipelineSpec(model=checkpoints.get("sd15"))
    base = run(spec, REQUEST, cache=cache)
    toggled = run(spec.with_optimization(ChannelsLastConfig(vae=True)), REQUEST, cache=cache)
    back = run(spec, REQUEST, cache=cache)
    assert toggled.stats.cache == "reconfigured" and back.stats.cache == "reconfigured"
    assert (cache.loads, len(disk_reads)) == (1, 1) and cache.applies == 3
    assert torch.equal(base.images_tensor, back.images_tensor)  # removal restored the exact pipeline
    torch.testing.assert_close(toggled.images_tensor, base.images_tensor, rtol=0, atol=1e-5)


def test_cache_is_bounded_by_count(checkpoints):
    cache = PipelineCache(max_entries=1)
    run(PipelineSpec(model=checkpoints.get("sd15")), REQUEST, cache=cache)
    run(PipelineSpec(model=checkpoints.get("taiyi")), REQUEST, cache=cache)
    assert len(cache) == 1 and cache.entries()[0].family.name == "taiyi"
    run(PipelineSpec(model=checkpoints.get("sd15")), REQUEST, cache=cache)
    assert cache.loads == 3


def test_cache_is_bounded_by_memory(checkpoints):
    cache = PipelineCache(max_entries=4, max_bytes=1)  # smaller than any model: keep only the one in use
    run(PipelineSpec(model=checkpoints.get("sd15")), REQUEST, cache=cache)
    run(PipelineSpec(model=checkpoints.get("sd2-base")), REQUEST, cache=cache)
    assert len(cache) == 1
    roomy = PipelineCache(max_entries=4, max_bytes=2**40)
    run(PipelineSpec(model=checkpoints.get("sd15")), REQUEST, cache=roomy)
    run(PipelineSpec(model=checkpoints.get("sd2-base")), REQUEST, cache=roomy)
    assert len(roomy) == 2 and roomy.memory_bytes() > 0
    roomy.clear()
    assert len(roomy) == 0


def test_memory_accounting_counts_originals_kept_for_exact_removal(checkpoints, cache):
    spec = PipelineSpec(model=checkpoints.get("sd15"))
    plain = cache.prepare(spec).nbytes()
    lowp = cache.prepare(spec.with_optimization(PrecisionConfig(unet="bf16", allow_emulated=True))).nbytes()
    unet = cache.entries()[0].pipe.unet
    unet_fp32 = sum(p.numel() * 4 for p in unet.parameters())
    assert lowp == pytest.approx(plain + unet_fp32 // 2, rel=0.01)  # bf16 copy + fp32 originals


def test_a_changed_file_on_disk_is_reloaded(checkpoints, cache, tmp_path):
    import os
    import shutil

    src = checkpoints.get("sd15")
    path = tmp_path / "model.safetensors"
    shutil.copy(src.path, path)
    spec = PipelineSpec(model=src.with_(path=str(path)))
    run(spec, REQUEST, cache=cache)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert run(spec, REQUEST, cache=cache).stats.cache == "loaded" and cache.loads == 2


def test_an_unavailable_option_falls_back_with_a_note_or_raises_when_strict(checkpoints, cache, monkeypatch):
    from sdaccel.optim.units.precision import unit as precision

    spec = PipelineSpec(model=checkpoints.get("sd15"))
    good = run(spec, REQUEST, cache=cache)
    monkeypatch.setattr(precision, "cpu_has_native", lambda name: False)
    lowp = spec.with_optimization(PrecisionConfig(unet="fp16"))
    with pytest.raises(UnavailableError, match="precision.unet=fp16"):
        run(lowp, REQUEST, cache=cache, strict=True)
    again = run(spec, REQUEST, cache=cache)
    assert torch.equal(good.images_tensor, again.images_tensor) and cache.loads == 1
    fallen = run(lowp, REQUEST, cache=cache)  # the UI path: fall back, say so once, keep going
    assert any("precision.unet=fp16 unavailable" in n for n in fallen.stats.notes)
    assert fallen.stats.dtypes["unet"] == "float32" and torch.equal(fallen.images_tensor, good.images_tensor)


def test_evict_and_clear(checkpoints, cache):
    spec = PipelineSpec(model=checkpoints.get("sd15"))
    cache.prepare(spec)
    assert cache.evict(spec) and len(cache) == 0 and not cache.evict(spec)
    cache.prepare(spec)
    cache.clear()
    assert len(cache) == 0


def test_loading_under_inference_mode_gives_normal_tensors(checkpoints, cache):
    """Hosts call the engine inside torch.inference_mode(); the cached weights must stay ordinary tensors."""
    spec = PipelineSpec(model=checkpoints.get("sd15")).with_optimization(ChannelsLastConfig())
    with torch.inference_mode():
        prepared = cache.prepare(spec)
    weight = prepared.pipe.unet.conv_in.weight
    assert not weight.is_inference()
    with torch.no_grad():
        weight.add_(0.0)  # an in-place weight edit (e.g. a LoRA) outside inference mode works
    assert cache.release(prepared) and len(cache) == 0 and not cache.release(prepared)
