"""Sampler names users know (A1111/ComfyUI wording) mapped to diffusers schedulers.

A fresh scheduler is built for every run from the model's noise-schedule config, so no stepping
state survives an interrupted or failed run.
"""

from __future__ import annotations

from ..spec.errors import ConfigError

SCHEDULER_CHOICES = ("auto", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "lcm", "tcd",
                     "euler_trailing", "ddim_trailing")
SCHEDULER_TITLES = {"euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M",
                    "dpmpp_2m_karras": "DPM++ 2M Karras", "ddim": "DDIM", "lcm": "LCM", "tcd": "TCD",
                    "euler_trailing": "Euler (trailing)", "ddim_trailing": "DDIM (trailing)"}
# Few-step models: LCM (LCM-LoRA, LCM-distilled checkpoints; 2-8 steps, CFG 1-2), TCD (TCD-LoRA, Hyper-SD; 2-8
# steps), and the trailing timesteps SDXL-Lightning / Hyper-SD checkpoints are distilled on (their first step
# starts from pure noise at t=999, which "leading" spacing never reaches).
_ALIASES = {"euler a": "euler_a", "euler_ancestral": "euler_a", "dpm++ 2m": "dpmpp_2m",
            "dpm++ 2m karras": "dpmpp_2m_karras", "dpmpp_2m_k": "dpmpp_2m_karras", "k_euler": "euler",
            "k_euler_a": "euler_a", "euler (trailing)": "euler_trailing", "ddim (trailing)": "ddim_trailing",
            "euler trailing": "euler_trailing", "ddim trailing": "ddim_trailing"}


def normalise_scheduler(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key.replace(" ", "_").replace("-", "_"))
    if key not in SCHEDULER_CHOICES:
        raise ConfigError("scheduler", f"unknown scheduler {name!r}",
                          f"choose one of: {', '.join(SCHEDULER_TITLES.values())}")
    return key


def make_scheduler(name: str, base_config: dict, *, turbo: bool = False):
    """A new diffusers scheduler `name` over the model's noise schedule (`base_config`)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
        TCDScheduler,
    )

    key = normalise_scheduler(name)
    config = dict(base_config)
    config.pop("_class_name", None)
    overrides: dict = {}
    if turbo or key.endswith("_trailing"):
        overrides["timestep_spacing"] = "trailing"
    key = key.removesuffix("_trailing")
    if key == "lcm":
        return LCMScheduler.from_config(config, **overrides)
    if key == "tcd":
        return TCDScheduler.from_config(config, **overrides)
    if key == "euler":
        return EulerDiscreteScheduler.from_config(config, **overrides)
    if key == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config, **overrides)
    if key in ("dpmpp_2m", "dpmpp_2m_karras"):
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       use_karras_sigmas=key == "dpmpp_2m_karras",
                                                       **overrides)
    config.setdefault("set_alpha_to_one", False)
    return DDIMScheduler.from_config(config, clip_sample=False, **overrides)
