"""Rows for optimum-intel's OpenVINO pipeline (the CPU peer a user would pick instead), on the same weights.

SDAccel's bench rows and optimum-intel run the same model side by side in one `bench` invocation: the
prepared pipeline's weights are written as a diffusers folder with the scheduler SDAccel's rows used and the
baseline's initial noise, then `peer_optimum_worker.py` runs under the Python that has optimum-intel (this one, or
`--optimum-python`: optimum-intel pins transformers and pulls torchvision, so it usually lives in a venv of its
own) and reports its times, its setup (export + compile) time, its peak memory and the image, which is
compared with SDAccel's baseline image like every other row.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..spec.errors import ConfigError, SDAccelError
from .metrics import psnr_db, ssim

WORKER = Path(__file__).with_name("peer_optimum_worker.py")
PRECISIONS = ("f32", "default")  # exact fp32, and what OpenVINO picks itself (bf16 on AVX512-BF16 / AMX CPUs)


def optimum_available(python: str) -> str | None:
    """None if `python` can import optimum-intel's OpenVINO pipeline, else why not."""
    try:
        done = subprocess.run([python, "-c", "import optimum.intel, openvino; print(optimum.intel.__name__)"],
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not start {python} ({exc})"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"optimum-intel is not importable with {python}: {last}"
    return None


def write_model_folder(prepared, plan, folder: Path) -> None:
    """The prepared (unoptimised) pipeline as a diffusers folder, with the scheduler SDAccel runs and the noise."""
    from ..models.schedulers import make_scheduler
    from ..run.sampler import _generators, _noise

    pipe = prepared.pipe
    fam = prepared.family
    scheduler = make_scheduler(plan.scheduler, prepared.loaded.scheduler_config, turbo=fam.turbo)
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        pipe.scheduler = original
    latent_shape = (pipe.unet.config.in_channels, plan.height // 8, plan.width // 8)
    torch.save(_noise(latent_shape, _generators(plan.seed, 1), "cpu"), folder / "latents.pt")


def run_optimum_rows(prepared, plan, settings, reference: torch.Tensor | None, *, python: str | None = None,
                     say: Callable[[str], None] = print) -> list[dict]:
    """One row per precision (fp32, OpenVINO's default), or one skipped row saying why optimum cannot run."""
    if settings.batch_size != 1 or plan.init is not None:
        raise ConfigError("bench --optimum", "compares txt2img with batch 1 only", "drop --batch-size")
    if prepared.family.name not in ("sd15", "sd2-base", "sd21-v", "sd-turbo", "taiyi"):
        return [{"preset": "optimum-intel", "skipped": f"{prepared.family.title}: the side-by-side row covers the "
                 "SD 1.x / 2.x pipelines (OVStableDiffusionPipeline)"}]
    python = python or sys.executable
    reason = optimum_available(python)
    if reason:
        say(f"[skip] optimum-intel: {reason}")
        return [{"preset": "optimum-intel", "skipped": f"{reason} (pip install optimum-intel[openvino] into a venv "
                 "and pass --optimum-python VENV/bin/python)"}]
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="sdaccel-optimum-"))
    try:
        say("[ref ] writing the same weights as a diffusers folder for optimum-intel ...")
        write_model_folder(prepared, plan, folder)
        for precision in PRECISIONS:
            say(f"[run ] optimum-intel ({precision}): export, compile, {settings.warmup} warm-up, "
                f"{settings.repeats} runs")
            job = {"folder": str(folder), "size": plan.width, "steps": plan.steps, "cfg": plan.cfg,
                   "prompt": plan.prompt, "negative": plan.negative, "precision": precision,
                   "warmup": settings.warmup, "repeats": settings.repeats,
                   "image_out": str(folder / f"image-{precision}.npy")}
            job_file = folder / f"job-{precision}.json"
            job_file.write_text(json.dumps(job), encoding="utf-8")
            quiet = {**os.environ, "CI": "true", "NNCF_CI": "1"}  # no usage telemetry (see units/compile/telemetry.py)
            done = subprocess.run([python, str(WORKER), str(job_file)], capture_output=True, text=True, env=quiet)
            if done.returncode != 0:
                tail = "\n".join(done.stderr.strip().splitlines()[-5:])
                raise SDAccelError(f"bench --optimum: optimum-intel ({precision}) failed:\n{tail}")
            found = json.loads(done.stdout.strip().splitlines()[-1])
            image = torch.from_numpy(np.load(job["image_out"]))
            rows.append(_row(precision, found, plan.steps, image, reference))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def _row(precision: str, found: dict, steps: int, image: torch.Tensor, reference) -> dict:
    runs = found["runs_s"]
    row = {"preset": f"optimum-intel-{precision}", "median_s": round(found["median_s"], 4),
           "min_s": round(min(runs), 4), "max_s": round(max(runs), 4), "speedup": None,
           "peak_mem_mb": round(found["peak_mem_mb"], 1), "psnr_db": None, "ssim": None, "unet_calls": steps,
           "compile_s": round(found["setup_s"], 2), "runs_s": [round(t, 4) for t in runs], "repeats": len(runs),
           "steps": steps, "optimizations": [f"optimum-intel OVStableDiffusionPipeline ({precision})"],
           "notes": ["compile_s is optimum's export + compile; peak memory is its own process's",
                     f"OpenVINO inference precision: {found.get('openvino_precision_hint')}"],
           "external": True}
    if reference is not None and image.shape == reference.shape:
        value = psnr_db(image, reference)
        row["psnr_db"] = None if value == float("inf") else round(value, 2)
        row["ssim"] = round(ssim(image, reference), 4)
    return row
