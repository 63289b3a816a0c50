"""The memory-budget planner: budgets as typed, the choice from a profile (fastest that fits, quality floors, the
fidelity cost of each lossy part), a profile measured on a tiny model and kept, re-measured when stale or broken,
and the CLI. (Its picks on the real SD 1.5 architecture: `python -m sdaccel plan`, in the README.)"""

from __future__ import annotations

import json
import time

import pytest
from sdaccel.optim.cli import main
from sdaccel.optim.plan import profile as profile_mod
from sdaccel.optim.plan.budget import parse_budget
from sdaccel.optim.plan.choose import choose, format_plan
from sdaccel.optim.plan.planner import apply_plan, find_profile, make_plan, profile_key
from sdaccel.optim.spec.errors import ConfigError
from sdaccel.optim.spec.model_ref import ModelRef
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec


def row(preset, median_s, peak_mb, psnr=None, ssim=None):
    return {"preset": preset, "median_s": median_s, "min_s": median_s * 0.95, "max_s": median_s * 1.05,
            "peak_mem_mb": peak_mb, "psnr_db": psnr, "ssim": ssim, "speedup": 10.0 / median_s, "mem_kind": "rss",
            "stage_peak_mem_mb": {"denoise": peak_mb, "decode": peak_mb * 0.9}}


REPORT = {"settings": {"family": "sd15", "size": 512, "steps": 20, "batch_size": 1}, "device": "cpu",
          "machine": {"cpu": "test CPU", "torch_threads": 2, "torch": "x"}, "rows": [
              row("baseline", 10.0, 4000), row("sdpa", 8.0, 3900, 120.0, 1.0),
              row("sdpa+winograd", 6.0, 3950, 108.0, 1.0), row("sdpa+winograd+staged", 6.5, 3000, 108.0, 1.0),
              row("sub-quadratic-attention+winograd+group-offload+vae-tiling", 12.0, 1500, 107.0, 1.0),
              row("sdpa+winograd+deepcache", 4.0, 3950, 33.0, 0.97),
              {**row("sdpa+winograd+tiny-vae", 5.5, 3800, 30.0, 0.95),
               "notes": ["vae: SYNTHETIC random-weight Tiny VAE (TAESD architecture) (benchmark only)"]},
              row("sdpa+winograd+deepcache+tiny-vae", 3.5, 3800, 28.0, 0.93),
              {"preset": "sdpa+bf16", "skipped": "no native bf16"}]}


@pytest.mark.parametrize("text, mib", [("6GB", 6144), ("5.5 GiB", 5632), ("5500MB", 5500), ("6", 6144), (2, 2048)])
def test_budgets_as_users_type_them(text, mib):
    assert parse_budget(text) == pytest.approx(mib)


@pytest.mark.parametrize("text", ["6XB", "-1GB", "0GB", "", "six"])
def test_a_bad_budget_names_the_flag_and_the_form(text):
    with pytest.raises(ConfigError, match="--budget.*6GB"):
        parse_budget(text)


def test_the_fastest_row_that_fits_with_the_cost_of_each_lossy_part():
    plan = choose(REPORT, 100 * 1024)
    assert plan.preset == "sdpa+winograd+deepcache+tiny-vae"
    costs = {c.part: (c.psnr_db, c.measured_in) for c in plan.lossy_parts}
    assert costs == {"deepcache": (33.0, "sdpa+winograd+deepcache"), "tiny-vae": (30.0, "sdpa+winograd+tiny-vae")}
    text = format_plan(plan, REPORT)
    assert "choice: sdpa+winograd+deepcache+tiny-vae" in text and "deepcache: 33.0 dB" in text
    assert "random-weight stand-in" in text.split("tiny-vae: 30.0 dB")[1].splitlines()[0]  # said where it holds
    assert "random-weight" not in text.split("deepcache: 33.0 dB")[1].splitlines()[0]
    assert "skipped: no native bf16" in text


def test_a_tight_budget_takes_the_memory_savers_and_headroom_counts():
    plan = choose(REPORT, 3500)  # 3325 MB after 5% headroom: staged (3000) and group offload (1500) fit
    assert plan.preset == "sdpa+winograd+staged" and not plan.lossy_parts
    assert {r["preset"] for r in plan.fits} == {"sdpa+winograd+staged",
                                                "sub-quadratic-attention+winograd+group-offload+vae-tiling"}
    assert "over budget" in format_plan(plan, REPORT).split("sdpa+winograd+deepcache ")[1].splitlines()[0]
    assert choose(REPORT, 3000, headroom=0.0).preset == "sdpa+winograd+staged"
    assert choose(REPORT, 3001, headroom=0.05).preset.startswith("sub-quadratic")  # 2851 MB: staged is over


def test_quality_floors():
    assert choose(REPORT, 100 * 1024, lossless=True).preset == "sdpa+winograd"
    assert choose(REPORT, 100 * 1024, min_psnr_db=32).preset == "sdpa+winograd+deepcache"
    plan = choose(REPORT, 100 * 1024, min_psnr_db=40)
    assert plan.preset == "sdpa+winograd" and {r["preset"] for r in plan.excluded} >= {"sdpa+winograd+deepcache"}


def test_a_budget_below_every_row_says_what_would_fit():
    with pytest.raises(ConfigError, match=r"--budget.*group-offload.*1500 MB.*at least 1\.6GB"):
        choose(REPORT, 1024)
    with pytest.raises(ConfigError, match="--headroom"):
        choose(REPORT, 1024, headroom=0.7)


@pytest.fixture
def measured(tiny_plan):
    """The profile measured on the tiny SD 1.5 model (64 px, 2 steps; conftest's `tiny_plan`)."""
    return tiny_plan["folder"], tiny_plan["plan"], tiny_plan["report"], tiny_plan["said"]


def test_the_measured_profile_holds_every_candidate_and_is_kept(measured):
    folder, plan, report, said = measured
    key = profile_key("sd15", 64, 2, model="synthetic-tiny:sd15")
    assert [r["preset"] for r in report["rows"]] == list(key.candidates)
    timed = [r for r in report["rows"] if "median_s" in r]
    assert {"baseline", "sdpa+winograd", "sdpa+winograd+staged"} <= {r["preset"] for r in timed}
    assert all(r.get("skipped") for r in report["rows"] if "median_s" not in r)  # skipped with a reason
    assert any("measuring this machine" in line for line in said)
    count = len(key.candidates)
    assert sum(line.startswith("[plan] ") and f"/{count} " in line for line in said) == count  # a process each
    assert report["plan"]["isolation"] == "one process per candidate"
    assert plan.row["median_s"] == min(r["median_s"] for r in timed)  # no budget pressure: the fastest
    assert profile_mod.profile_path(key, folder).is_file()
    again: list = []
    assert find_profile(key, measure="never", folder=folder, say=again.append)["rows"] == report["rows"]
    assert not again  # read back, not measured


def test_a_budget_between_the_peaks_picks_the_fastest_under_it(measured):
    folder, _, report, _ = measured
    timed = sorted((r for r in report["rows"] if "median_s" in r), key=lambda r: r["peak_mem_mb"])
    budget = (timed[0]["peak_mem_mb"] + timed[-1]["peak_mem_mb"]) / 2 / 0.95
    plan, _ = make_plan(f"{budget:.3f}MB", family="sd15", size=64, steps=2, model="synthetic-tiny:sd15",
                        folder=folder, measure="never")
    assert plan.peak_mb <= budget * 0.95
    assert all(r["median_s"] >= plan.expected_s for r in timed if r["peak_mem_mb"] <= budget * 0.95)
    assert any(r["peak_mem_mb"] > budget * 0.95 for r in timed)


@pytest.mark.parametrize("change, reason", [
    (lambda r: r["machine"].update(cpu="another CPU"), "cpu was"),
    (lambda r: r["plan"].update(measured_at=time.time() - 40 * 86400), "older than 30 days"),
    (lambda r: r["plan"].update(candidates=["baseline"]), "candidate combinations changed"),
    (lambda r: r["plan"].update(measurement=0), "the old way"),
    (lambda r: r["settings"].update(size=128), "size 128"),
])
def test_a_stale_profile_is_not_used(measured, tmp_path, change, reason):
    folder, _, report, _ = measured
    key = profile_key("sd15", 64, 2, model="synthetic-tiny:sd15")
    stale = json.loads(json.dumps(report))
    change(stale)
    path = profile_mod.profile_path(key, tmp_path)
    path.write_text(json.dumps(stale))
    loaded, why = profile_mod.load_profile(key, tmp_path)
    assert loaded is None and reason in why
    with pytest.raises(ConfigError, match="--measure"):
        find_profile(key, measure="never", folder=tmp_path)


def test_a_broken_profile_is_measured_again_and_replaced_whole(tmp_path):
    key = profile_key("sd15", 64, 1, model="synthetic-tiny:sd15", exclude=("tome", "deepcache", "tiny-vae",
                                                                               "cfg-cutoff-50", "group-offload"))
    assert all("deepcache" not in c and "group-offload" not in c for c in key.candidates)
    path = profile_mod.profile_path(key, tmp_path)
    path.write_text('{"rows": [')
    assert "unreadable" in profile_mod.load_profile(key, tmp_path)[1]
    report = find_profile(key, folder=tmp_path, repeats=1, warmup=0, say=lambda _: None)
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial file left beside it


def test_applying_a_plan_and_the_tiny_vae_it_needs_for_a_real_model(checkpoints, cache):
    from sdaccel.optim.run.sampler import run

    plan = choose(REPORT, 100 * 1024)
    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=2, seed=1)
    real = PipelineSpec(model=checkpoints.get("sd15"))
    with pytest.raises(ConfigError, match="tiny_vae.*TAESD"):
        apply_plan(plan, real, request)
    spec, planned = apply_plan(plan, PipelineSpec(model=ModelRef.synthetic("sd15", tiny=True)), request)
    assert {c.kind for c in spec.optimizations} - {"precision"} == {"attention", "winograd", "deepcache", "vae"}
    spec, planned = apply_plan(choose(REPORT, 3500), real, request)
    result = run(spec, planned, cache=cache)
    assert {"attention", "winograd", "offload"} <= {a["kind"] for a in result.stats.applied}


def test_unknown_exclusions_and_bad_sizes_are_named():
    with pytest.raises(ConfigError, match="--exclude.*tiny-vea"):
        profile_key("sd15", 512, 20, exclude=("tiny-vea",))
    with pytest.raises(ConfigError, match="--size"):
        profile_key("sd15", 32, 20)


def test_the_cli_plans_from_a_bench_report_and_refuses_bad_input(tmp_path, capsys):
    source = tmp_path / "bench.json"
    source.write_text(json.dumps(REPORT))
    out = tmp_path / "plan.json"
    assert main(["plan", "--budget", "3.5GB", "--profile", str(source), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured elsewhere or long ago (cpu was 'test CPU'" in printed  # REPORT names another CPU
    assert "choice: sdpa+winograd+staged" in printed and "--preset sdpa+winograd+staged" in printed
    assert json.loads(out.read_text())["plan"]["preset"] == "sdpa+winograd+staged"
    assert main(["plan", "--budget", "6XB", "--profile", str(source)]) == 2
    assert "--budget" in capsys.readouterr().err
    assert main(["plan", "--budget", "1GB", "--profile", str(source)]) == 2
    assert "at least 1.6GB" in capsys.readouterr().err
    assert main(["plan", "--budget", "6GB", "--profile", str(tmp_path / "none.json")]) == 2
    assert "none.json does not exist" in capsys.readouterr().err


def test_generate_fits_to_memory_and_refuses_a_bad_budget(tmp_path, capsys, plan_dir):
    out = tmp_path / "out"
    args = ["generate", "--checkpoint", "synthetic-tiny:sd15", "--prompt", "a fox", "--width", "64", "--height", "64",
            "--steps", "2", "--out", str(out)]
    assert main(args + ["--fit-memory", "1000GB", "--fit-quality", "lossless"]) == 0
    printed = capsys.readouterr().out
    chosen = printed.split("fit to 1000GB: ")[1].split(" (expected")[0]
    from sdaccel.optim.bench.presets import resolve_preset

    last = printed.strip().splitlines()[-1]  # the run's statistics line: what ran
    for cfg in resolve_preset(chosen).configs():
        assert cfg.kind in last, (cfg.kind, last)
    assert len(list(out.glob("*.png"))) == 1
    assert main(args + ["--fit-memory", "6XB"]) == 2
    assert "--fit-memory" in capsys.readouterr().err
    assert main(args + ["--tiny-vae", "taesd.pth"]) == 2
    assert "only apply with --fit-memory" in capsys.readouterr().err
    assert len(list(out.glob("*.png"))) == 1  # the refused runs wrote nothing


def test_bench_processes_share_the_baseline_images_for_their_fidelity(tmp_path, capsys):
    """What the planner's one-process-per-candidate measurement rests on: --save-reference, then --reference."""
    common = ["bench", "--checkpoint", "synthetic-tiny:sd15", "--family", "sd15", "--size", "64", "--steps", "2",
              "--repeats", "1", "--warmup", "0"]
    images = tmp_path / "baseline.safetensors"
    assert main(common + ["--preset", "baseline", "--save-reference", str(images)]) == 0 and images.is_file()
    out = tmp_path / "tome.json"
    assert main(common + ["--preset", "tome", "--reference", str(images), "--json", str(out)]) == 0
    assert "[ref ]" not in capsys.readouterr().out  # the baseline was not rendered again
    row = json.loads(out.read_text())["rows"][0]
    assert row["preset"] == "tome" and 0 < row["psnr_db"] < 60
    assert main(common + ["--preset", "tome", "--reference", str(tmp_path / "none.safetensors")]) == 2
    assert "--reference" in capsys.readouterr().err
    out.write_text("not images")
    assert main(common + ["--preset", "tome", "--reference", str(out)]) == 2
    assert "holds no reference images" in capsys.readouterr().err
