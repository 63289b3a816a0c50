"""SDAccelFitToMemory: the planner's choice for a memory budget, applied to the pipe.

The engine's planner (`optim/plan`) picks the fastest combination this machine measured within the budget; the
profile is measured once per machine, family, size and steps (minutes at 512 px, in ComfyUI's console) and kept
in SDAccel's cache folder. The node adds the choice to the pipe (replacing toggles of the same kind) and
returns the plan as text: the choice, its expected time and memory, and the fidelity cost of each lossy part.
"""

from __future__ import annotations

import logging

from ..optim.bench.presets import resolve_preset
from ..optim.plan.choose import format_plan
from ..optim.plan.planner import QUALITY, plan_for
from ..optim.spec.pipeline import GenerationRequest
from . import host
from .pipe import PIPE, PIPE_TOOLTIP, SDAccelPipe

log = logging.getLogger(__name__)

MEASURE = {"when missing or stale": "auto", "never (fail instead)": "never"}


class SDAccelFitToMemory:
    """Memory-budget planner: the fastest measured optimizations that fit."""

    CATEGORY = "sdaccel/optimizations"
    DESCRIPTION = ("Pick the fastest combination of SDAccel optimizations that fits a memory budget on this machine "
                   "(process RAM on a CPU, GPU memory on a GPU), from timings and peaks measured here once per "
                   "model family, size and steps. The plan output says what was chosen, the expected time and "
                   "memory, and what each lossy part costs in PSNR/SSIM.")
    RETURN_TYPES = (PIPE, "STRING")
    RETURN_NAMES = ("pipe", "plan")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipe": (PIPE, {"tooltip": PIPE_TOOLTIP}),
            "budget_gb": ("FLOAT", {"default": 6.0, "min": 0.5, "max": 1024.0, "step": 0.5,
                                    "tooltip": "Memory the generation must stay within, in GB"}),
            "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64,
                              "tooltip": "The size you will sample at (the sampler's width)"}),
            "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64,
                               "tooltip": "The size you will sample at (the sampler's height)"}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                              "tooltip": "The steps you will sample with (the expected time is for these)"}),
            "quality": (list(QUALITY), {"default": "any", "tooltip": "any: lossy parts allowed (their cost is "
                                        "reported); at least 30 dB PSNR against the plain image; or lossless"}),
            "measure": (list(MEASURE), {"default": "when missing or stale", "tooltip": "Measure this machine's "
                                        "profile when none is kept (a few minutes at 512 px), or fail instead"}),
            "tiny_vae": ("STRING", {"default": "", "tooltip": "A TAESD decoder (models/vae_approx name or path): "
                                    "lets the plan use the Tiny VAE. Empty: plans without it"}),
        }}

    def apply(self, pipe: SDAccelPipe, budget_gb: float, width: int, height: int, steps: int, quality: str,
              measure: str, tiny_vae: str = ""):
        base = pipe.specs()[0]
        tiny = host.resolve_model_file("vae", "path", tiny_vae.strip()) if tiny_vae.strip() else ""
        request = GenerationRequest(prompt="", width=width, height=height, steps=steps)
        planned, _, plan, report = plan_for(base, request, f"{budget_gb}GB", quality=quality, tiny_vae=tiny,
                                            measure=MEASURE.get(measure, measure), say=log.info)
        new = pipe
        for cfg in planned.optimizations:
            if cfg not in base.optimizations:
                new = new.with_optimization(cfg)
        run_settings = resolve_preset(plan.preset).request  # the plan's per-run changes (the CFG cutoff)
        if run_settings:
            new = new.with_run_settings(**run_settings)
        return new, format_plan(plan, report)
