"""The timesteps a stream denoises at and their coefficients, computed once per stream (pre-computation).

A stream runs a fixed, short list of timesteps per frame (`steps` of them; img2img starts at `strength`). Each
step turns the UNet's prediction into a denoised latent with the consistency-model boundary condition
`denoised = c_out * x0 + c_skip * x_t` (LCM's scalings on an LCM model; 0 and 1 on a Turbo model, which predicts
x0 outright), then re-noises it to the next step's timestep with that stage's fixed noise.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec.errors import ConfigError


@dataclass(frozen=True)
class StreamSchedule:
    """Per-step tensors, each shaped [steps, 1, 1, 1] so they broadcast over a stream batch."""

    timesteps: object  # long [steps]
    alpha: object  # sqrt(alpha_cumprod_t)
    sigma: object  # sqrt(1 - alpha_cumprod_t)
    c_skip: object
    c_out: object
    prediction: str  # "epsilon" | "v_prediction"
    kind: str  # "lcm" | "turbo"

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def epsilon(self, latents, model_out, rows=slice(None)):
        """The noise estimate (what guidance combines), for either prediction type."""
        if self.prediction == "v_prediction":
            return self.sigma[rows] * latents + self.alpha[rows] * model_out
        return model_out

    def denoised(self, latents, epsilon, rows=slice(None)):
        """The boundary-conditioned denoised latent from a noise estimate."""
        a, s = self.alpha[rows], self.sigma[rows]
        x0 = (latents - s * epsilon) / a
        return self.c_out[rows] * x0 + self.c_skip[rows] * latents

    def noised(self, x0, noise, rows=slice(None)):
        """`x0` taken to the timesteps `rows` with `noise`."""
        return self.alpha[rows] * x0 + self.sigma[rows] * noise


def stream_schedule(scheduler_config: dict, *, steps: int, strength: float, kind: str, device,
                    dtype=None) -> StreamSchedule:
    """The schedule for `steps` steps from `strength` (1.0: from pure noise, txt2img) on the model's noise
    schedule. `kind` "lcm" takes LCM's own timesteps and boundary scalings (LCM-LoRA / LCM models); "turbo" takes
    evenly spaced trailing timesteps (t = 1000 * strength * (1 - k / steps) - 1) and predicts x0 outright."""
    import torch
    from diffusers import LCMScheduler

    if steps < 1 or steps > 50:
        raise ConfigError("StreamSettings.steps", f"{steps} steps", "use 1 to 50 (streams run 1-4)")
    if not 0.0 < strength <= 1.0:
        raise ConfigError("StreamSettings.strength", f"{strength} is outside (0, 1]",
                          "use 1.0 for txt2img, about 0.3-0.7 for img2img")
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    lcm = LCMScheduler.from_config(config)
    if kind == "lcm":
        if int(steps / strength) > lcm.config.original_inference_steps:
            raise ConfigError("StreamSettings.steps", f"{steps} LCM steps at strength {strength} need more than "
                              f"the {lcm.config.original_inference_steps} timesteps LCM was distilled on",
                              "use fewer steps or a higher strength")
        lcm.set_timesteps(steps, strength=strength)
        timesteps = lcm.timesteps.long()[:steps]
        scalings = [lcm.get_scalings_for_boundary_condition_discrete(int(t)) for t in timesteps]
        c_skip = torch.tensor([float(s) for s, _ in scalings])
        c_out = torch.tensor([float(o) for _, o in scalings])
    elif kind == "turbo":
        top = lcm.config.num_train_timesteps * strength
        timesteps = torch.tensor([max(0, round(top * (1 - k / steps)) - 1) for k in range(steps)], dtype=torch.long)
        c_skip, c_out = torch.zeros(steps), torch.ones(steps)
    else:
        raise ConfigError("StreamSettings.scheduler", f"unknown stream scheduler {kind!r}", "use lcm or turbo")
    if len(timesteps) != steps:
        raise ConfigError("StreamSettings.steps", f"the scheduler gave {len(timesteps)} timesteps for {steps}",
                          "use fewer steps or a higher strength")
    cumprod = lcm.alphas_cumprod[timesteps].double()
    shape = (steps, 1, 1, 1)

    def column(values):
        return values.reshape(shape).to(device, dtype or torch.float32)

    return StreamSchedule(timesteps.to(device), column(cumprod.sqrt()), column((1 - cumprod).sqrt()),
                          column(c_skip), column(c_out), config.get("prediction_type", "epsilon"), kind)


__all__ = ["StreamSchedule", "stream_schedule"]
