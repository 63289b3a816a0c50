"""`bench comfyui` against the real ComfyUI in ../shared/hosts: the bench starts the host itself, times core
KSampler prompts with the patches, decodes and compares their images, and writes its table, JSON and chart.
Bad settings stop before anything is built or started."""

from __future__ import annotations

import json

import comfy_host
import pytest
from sdaccel.optim.bench import comfyui as bench
from sdaccel.optim.bench.runner import write_report
from sdaccel.optim.spec.errors import ConfigError


def test_bad_settings_are_refused_before_any_work(tmp_path):
    for settings, field in ((bench.ComfyBenchSettings("x", "y", variants=["winograd", "turbo"]), "--variants"),
                            (bench.ComfyBenchSettings("x", "y", model="sd99"), "model"),
                            (bench.ComfyBenchSettings("x", "y", model="sd15-shallow"), "model"),
                            (bench.ComfyBenchSettings("x", "y", repeats=0), "--repeats")):
        with pytest.raises(ConfigError, match=field):
            bench.run_comfyui_bench(settings, say=lambda s: None, workdir=str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing written


def test_inductor_is_a_variant_matched_by_the_engines_frozen_inductor():
    from sdaccel.optim.spec.optimization import config_class

    variant = bench.VARIANTS["compile-inductor"]
    assert variant.patches == (("SDAccelCompileModel", {"backend": "inductor"}),)
    kind, fields = variant.engine
    cfg = config_class(kind)(**fields)
    assert cfg.backend == "inductor" and cfg.freezing  # what the node compiles: the weights frozen in
    assert bench.run_order(["compile-inductor"]) == ["baseline", "compile-inductor"]


def test_variants_timed_against_another_run_after_it():
    assert bench.run_order(["sdpa+cfg-cutoff", "winograd"]) == \
        ["baseline", "attention-pytorch", "sdpa+cfg-cutoff", "winograd"]
    assert bench.run_order(["winograd", "baseline", "attention-pytorch", "sdpa+deepcache"]) == \
        ["baseline", "winograd", "attention-pytorch", "sdpa+deepcache"]


@pytest.mark.skipif(not comfy_host.COMFYUI_PATH, reason=comfy_host.SKIP_REASON)
def test_bench_times_the_patches_in_the_real_host_and_compares_their_images(tmp_path):
    from pathlib import Path

    checkout = Path(comfy_host.COMFYUI_PATH).resolve()
    settings = bench.ComfyBenchSettings(str(checkout), comfy_host.host_python(checkout), size=64, steps=2, repeats=2,
                                  warmup=1, variants=["cfg-cutoff", "precision-half", "channels-last"],
                                  engine=False, model="sd15-shallow")
    said = []
    report = bench.run_comfyui_bench(settings, say=said.append, workdir=str(tmp_path / "host"))
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == ["baseline", "cfg-cutoff", "precision-half", "channels-last"], said
    for row in rows.values():
        assert "skipped" not in row, row
        assert len(row["runs_s"]) == 2 and all(t > 0 for t in row["runs_s"]) and len(row["warmup_s"]) == 1
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
    assert rows["baseline"]["speedup"] == 1.0 and rows["baseline"]["psnr_db"] is None
    assert rows["cfg-cutoff"]["psnr_db"] is not None and rows["cfg-cutoff"]["psnr_db"] < 100  # a change, not rounding
    assert rows["channels-last"]["identical_to_baseline"] or rows["channels-last"]["psnr_db"] > 60  # lossless
    log = (tmp_path / "host" / "server.log").read_text(errors="replace")
    assert "SDAccel CFG Cutoff (model):" in log and "SDAccel Precision (model):" in log  # the patches ran
    table = bench.format_comfyui_table(report)
    assert all(name in table for name in rows) and "KSampler in ComfyUI" in table
    written, table_file = write_report(report, tmp_path / "bench.json", table, "bench comfyui")
    saved = json.loads(written.read_text())
    assert table_file == tmp_path / "bench.md" and table in table_file.read_text()
    assert saved["rows"][1]["variant"] == "cfg-cutoff" and saved["machine"]["cpu"]
    assert bench.write_comfyui_chart(report, tmp_path / "bench.png").stat().st_size > 1000
