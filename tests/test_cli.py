"""`python -m sdaccel generate|bench`: files, stats line, JSON report and clear failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from sdaccel.optim.cli import main


def test_generate_writes_pngs_with_settings_and_prints_stats(checkpoints, tmp_path, capsys):
    ref = checkpoints.get("sd15")
    out = tmp_path / "out"
    rc = main(["generate", "--checkpoint", ref.path, "--config-dir", ref.config_dir, "--prompt", "a red fox",
               "--negative", "blurry", "--steps", "2", "--width", "64", "--height", "64", "--seed", "41",
               "--cfg", "6.5", "--scheduler", "euler_a", "--batch", "2", "--out", str(out)])
    assert rc == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["sdaccel_41.png", "sdaccel_42.png"]
    with Image.open(files[1]) as im:
        assert im.size == (64, 64)
        params = im.text["parameters"]
        meta = json.loads(im.text["sdaccel"])
    assert params.startswith("a red fox\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 6.5, "
                             "Seed: 42, Size: 64x64")
    assert meta["request"]["seed"] == 41 and meta["stats"]["unet_calls"] == 2
    assert meta["spec"]["model"]["path"] == ref.path
    printed = capsys.readouterr().out
    assert "sd15 txt2img 64x64x2 Euler a 2/2 steps" in printed and "peak" in printed


def test_generate_img2img_and_optimizations(checkpoints, tmp_path, capsys):
    ref = checkpoints.get("sd15")
    src = tmp_path / "src.png"
    Image.new("RGB", (64, 64), (10, 120, 200)).save(src)
    rc = main(["generate", "--checkpoint", ref.path, "--config-dir", ref.config_dir, "--prompt", "x",
               "--steps", "4", "--init-image", str(src), "--strength", "0.5", "--opt", "channels_last:vae=true",
               "--out", str(tmp_path / "o")])
    assert rc == 0
    printed = capsys.readouterr().out
    # img2img at strength 0.5 runs the last 2 of 4 scheduled steps
    assert "img2img 64x64x1" in printed and "2/4 steps" in printed and "channels_last(vae=True)" in printed


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/no/such/model.safetensors"], "no such file"),
    (["--checkpoint", "synthetic-tiny:sd15", "--width", "70"], "multiple of 8"),
    (["--checkpoint", "synthetic-tiny:sd15", "--opt", "precision:unet=fp99"], "PrecisionConfig.unet"),
    (["--checkpoint", "synthetic-tiny:sd15", "--opt", "attention:slice_size=many"],
     "--opt attention:slice_size=many: AttentionConfig.slice_size: 'many' is not a whole number"),
    (["--checkpoint", "synthetic-tiny:sd15", "--opt", "vae:slicing=ture"], "'ture' is not true or false"),
    (["--checkpoint", "synthetic-tiny:sd15", "--opt", "vae:slicing"], "'slicing' has no value"),
    (["--checkpoint", "synthetic-tiny:sd15", "--switch-at", "0.8"], "--switch-at: applies to the refiner ensemble"),
    (["--checkpoint", "synthetic-tiny:sdxl-base", "--refiner", "synthetic-tiny:sdxl-refiner", "--switch-at", "2"],
     "EnsembleSpec.switch_at"),
])
def test_generate_bad_input_exits_2_with_the_message_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    rc = main(["generate", "--prompt", "x", "--steps", "1", "--out", str(out)] + args)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_bench_prints_a_table_and_writes_the_json_rows(tmp_path, capsys):
    report = tmp_path / "bench.json"
    rc = main(["bench", "--family", "sd15", "--checkpoint", "synthetic-tiny:sd15", "--size", "64", "--steps", "2",
               "--repeats", "2", "--preset", "baseline", "--preset", "channels-last",
               "--preset", "channels-last+fp32", "--json", str(report)])
    assert rc == 0
    data = json.loads(report.read_text())
    rows = {r["preset"]: r for r in data["rows"]}
    assert list(rows) == ["baseline", "channels-last", "channels-last+fp32"]
    for row in rows.values():
        for key in ("preset", "median_s", "min_s", "max_s", "speedup", "peak_mem_mb"):
            assert key in row, key
        assert row["min_s"] <= row["median_s"] <= row["max_s"] and row["repeats"] == 2
    assert rows["baseline"]["speedup"] == 1.0
    assert rows["channels-last"]["speedup"] == pytest.approx(rows["baseline"]["median_s"] /
                                                              rows["channels-last"]["median_s"], rel=1e-2)
    assert data["machine"]["cpu"] and data["settings"]["steps"] == 2
    printed = capsys.readouterr().out
    assert "speedup" in printed and "channels-last" in printed
    saved = (tmp_path / "bench.md").read_text()  # the printed table, beside the JSON
    assert saved.startswith("# bench: sd15 64x64, 2 steps") and "Data: `bench.json`" in saved
    table = saved.split("```text\n", 1)[1].split("\n```", 1)[0]
    assert table in printed and "channels-last+fp32" in table and f"wrote {tmp_path / 'bench.md'}" in printed


def test_bench_comfyui_saves_its_table_beside_the_json_as_the_presets_mode_does(tmp_path, capsys, monkeypatch):
    from sdaccel.optim.bench import comfyui

    stored = json.loads((Path(__file__).parents[1] / "results" / "comfyui-patches-sd15-256-10steps.json").read_text())
    monkeypatch.setattr(comfyui, "run_comfyui_bench", lambda settings: stored)  # the host run itself: test_comfy_bench
    report = tmp_path / "comfy.json"
    rc = main(["bench", "comfyui", "--comfyui", "x", "--comfyui-python", "y", "--size", "256", "--steps", "10",
               "--json", str(report)])
    assert rc == 0
    printed = capsys.readouterr().out
    saved = (tmp_path / "comfy.md").read_text()
    assert saved.startswith("# bench comfyui: sd15 256x256, 10 steps")
    assert comfyui.format_comfyui_table(stored) in saved and comfyui.format_comfyui_table(stored) in printed
    assert json.loads(report.read_text())["rows"] == stored["rows"]


def test_bench_skips_an_unavailable_preset_with_the_reason(tmp_path, capsys, monkeypatch):
    from sdaccel.optim.units.precision import unit as precision

    monkeypatch.setattr(precision, "cpu_has_native", lambda name: False)
    report = tmp_path / "bench.json"
    rc = main(["bench", "--checkpoint", "synthetic-tiny:sd15", "--size", "64", "--steps", "1", "--repeats", "1",
               "--preset", "baseline", "--preset", "bf16", "--json", str(report)])
    assert rc == 0
    rows = json.loads(report.read_text())["rows"]
    assert rows[1]["preset"] == "bf16" and "no native bf16" in rows[1]["skipped"]
    assert "[skip] bf16" in capsys.readouterr().out


def test_bench_unknown_preset_is_a_clear_error(capsys):
    assert main(["bench", "--checkpoint", "synthetic-tiny:sd15", "--preset", "turbo-mode"]) == 2
    assert "unknown preset 'turbo-mode'" in capsys.readouterr().err


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "sdaccel", "bench", "--list-presets"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "baseline" in proc.stdout and "channels-last" in proc.stdout


def test_generate_with_a_refiner_runs_the_ensemble_and_records_what_ran(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", "--checkpoint", "synthetic-tiny:sdxl-base", "--refiner", "synthetic-tiny:sdxl-refiner",
               "--switch-at", "0.5", "--prompt", "a cabin", "--steps", "4", "--width", "64", "--height", "64",
               "--opt", "attention:backend=xformers", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sdxl-base+sdxl-refiner ensemble(switch_at=0.5)" in printed
    (png,) = out.glob("*.png")
    with Image.open(png) as im:
        meta = json.loads(im.text["sdaccel"])
    assert meta["spec"]["switch_at"] == 0.5
    assert meta["spec"]["refiner"]["model"]["path"] == "synthetic-tiny:sdxl-refiner"
    # xformers is unavailable on a CPU: the PNG records the sdpa fallback that ran, and the note says why
    assert [d["backend"] for d in meta["applied"] if d["kind"] == "attention"] == ["sdpa"]
    assert "attention" in meta["stats"]["optimizations"] and any("xformers" in n for n in meta["stats"]["notes"])


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (["generate", "--checkpoint", "synthetic-tiny:sd15", "--prompt", "x", "--out", str(blocker)],
         "--out: " + str(blocker) + " is a file"),
        (["generate", "--checkpoint", "synthetic-tiny:sd15", "--prompt", "x", "--out", str(tmp_path / "o"),
          "--init-image", str(tmp_path / "missing.png")], "--init-image: "),
        (["bench", "--json", str(tmp_path)], "--json: " + str(tmp_path) + " is a folder"),
        (["bench", "--chart", str(blocker / "chart.png")], "--chart: " + str(blocker) + " is a file"),
        (["bench", "--repeats", "0", "--size", "64", "--steps", "1"], "bench --repeats: 0 is below 1"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written, nothing left behind
