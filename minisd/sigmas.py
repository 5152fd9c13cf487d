"""Sampling grids: the noise levels a sampler steps through, evenly in timesteps or spaced as Karras et al.

A sampler with n steps visits n noise levels and ends at none. In σ-space (x̄ = x_0 + σ ε, σ² = (1 - ᾱ) / ᾱ,
see ``schedules``) that is a grid σ_0 > σ_1 > … > σ_{n-1} > σ_n = 0, plus the timestep t_i the model is told at
each level. Two ways to choose it:

* **Evenly in timesteps** (``inference_sigmas``): t_i from ``NoiseSchedule.inference_timesteps`` (SD's
  "leading" spacing), σ_i = σ(t_i). Every sampler can use it, DDPM and DDIM included.
* **Karras spacing** (``karras_sigmas``; Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
  Generative Models", eq. 5, ρ = 7): σ's evenly spaced in σ^(1/ρ), so that more steps fall at low noise,
  where fine detail is decided; each t_i is read back from σ_i (``NoiseSchedule.sigma_to_timestep``). Only
  the samplers that step between σ's can use it: ``KARRAS_SAMPLERS``. This is diffusers'
  ``use_karras_sigmas=True``; the WebUI's "DPM++ 2M Karras" is ``sampler="dpmpp_2m"`` with it.

Notation: σ is σ-space's (Karras') σ = √((1 - ᾱ) / ᾱ), not DDPM's posterior standard deviation σ_t.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .schedules import NoiseSchedule

SIGMA_SPACE_SAMPLERS = ("euler", "euler_ancestral", "heun")  # their state is x̄ = x_t / √ᾱ_t
KARRAS_SAMPLERS = SIGMA_SPACE_SAMPLERS + ("dpmpp_2m",)  # those that step between σ's, not training timesteps
KARRAS_RHO = 7.0  # ρ of Karras et al. 2022, eq. 5 (their choice for all samplers; diffusers' and k-diffusion's)


def inference_sigmas(schedule: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    """σ = √((1 - ᾱ_t) / ᾱ_t) at each inference timestep, then a final 0 (diffusers' "zero"): (n + 1,).

    Computed with diffusers' float32 expression rather than taken from ``schedule.sigmas`` (= √(1 / SNR)),
    which differs in the last bit for some t: this way the σ-space samplers match diffusers bit for bit.
    """
    alpha_bar = schedule.alphas_cumprod[timesteps]
    return torch.cat([((1 - alpha_bar) / alpha_bar) ** 0.5, torch.zeros(1)])


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """n noise levels from σ_max down to σ_min, evenly spaced in σ^(1/ρ) (Karras et al. 2022, eq. 5):

        σ_i = (σ_max^(1/ρ) + i / (n - 1) · (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ,   i = 0 … n - 1

    ρ = 1 spaces σ evenly, ρ → ∞ spaces log σ evenly; ρ = 7 crowds the steps at low noise. The final σ_n = 0
    of eq. 5 is left out (``sampling_grid`` appends it). Returns (n,), float64, computed with the operations of
    diffusers' ``_convert_to_karras`` (k-diffusion's ``get_sigmas_karras``). n = 1 gives [σ_max].
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int ≥ 1, got {num_inference_steps!r}.")
    if not 0 < sigma_min <= sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min ≤ sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
        raise ValueError(f"rho must be a number > 0 (Karras et al. use 7), got {rho!r}.")
    ramp = np.linspace(0, 1, num_inference_steps)  # i / (n - 1)
    min_inv_rho, max_inv_rho = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return torch.from_numpy((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def sampling_grid(
    schedule: NoiseSchedule, sampler: str, num_inference_steps: int, timestep_spacing: str = "leading",
    steps_offset: int = 1, use_karras_sigmas: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``samplers.sample`` steps through: (timesteps (n,) long, the model's t at each step; sigmas (n + 1,)
    float32, each step's σ and a final 0).

    By default the timesteps are ``schedule.inference_timesteps(…)`` and σ_i = σ(timesteps[i]). With
    ``use_karras_sigmas`` the σ's are ``karras_sigmas`` and each timestep is ``schedule.sigma_to_timestep(σ_i)``
    rounded to an integer, as diffusers does it with ``use_karras_sigmas=True``:

    * euler, euler_ancestral, heun (diffusers' ``EulerDiscreteScheduler``, ``HeunDiscreteScheduler``): σ runs
      from σ(timesteps[0]) to σ(timesteps[-1]) of the spacing's own grid (SD's "leading" with n = 10: σ(901)
      … σ(1); "linspace": σ(T-1) … σ(0)). diffusers hands the model the fractional t; minisd's models take
      integer t, so t is rounded: only the time embedding sees it (≤ half a training step), while σ, the
      input scaling and the update stay exact. (``EulerAncestralDiscreteScheduler`` has no Karras option in
      diffusers 0.42; we use Euler's grid.)
    * dpmpp_2m (``DPMSolverMultistepScheduler``, the WebUI's "DPM++ 2M Karras"): σ(T-1) … σ(0) whatever the
      spacing, and diffusers rounds t itself (not for "squaredcos_cap_v2", which we round all the same).

    ddpm and ddim step between training timesteps, so Karras σ's are refused for them (diffusers' DDPM and
    DDIM schedulers have no such option either).
    """
    timesteps = schedule.inference_timesteps(num_inference_steps, timestep_spacing, steps_offset)  # checks n, spacing
    if not isinstance(use_karras_sigmas, bool):
        raise ValueError(f"use_karras_sigmas must be True or False, got {use_karras_sigmas!r}.")
    if not use_karras_sigmas:
        return timesteps, inference_sigmas(schedule, timesteps)
    if sampler not in KARRAS_SAMPLERS:
        raise ValueError(f"use_karras_sigmas=True applies to samplers {KARRAS_SAMPLERS}, not sampler={sampler!r}, "
                         "which steps between training timesteps; use one of those or leave use_karras_sigmas=False.")
    ends = torch.tensor([schedule.num_train_timesteps - 1, 0]) if sampler == "dpmpp_2m" else timesteps[[0, -1]]
    sigma_max, sigma_min = inference_sigmas(schedule, ends)[:2].tolist()  # float32 σ's as Python floats, as diffusers
    sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)  # (n,) float64
    timesteps = schedule.sigma_to_timestep(sigmas).round().long()  # half to even, as numpy's round in diffusers
    return timesteps, torch.cat([sigmas.float(), torch.zeros(1)])


def init_noise_sigma(sigmas: torch.Tensor, timestep_spacing: str) -> torch.Tensor:
    """How σ-space samplers scale unit noise to x̄_T, as diffusers' ``init_noise_sigma``.

    "leading" starts at t < T-1, where ᾱ is not ≈ 0: unit noise read as x_t becomes x̄ = x_t √(σ² + 1);
    "trailing" and "linspace" use σ_max (Karras' x̄_T ~ N(0, σ_max² I)), 0.2% smaller for SD.
    """
    return sigmas.max() if timestep_spacing in ("linspace", "trailing") else (sigmas.max() ** 2 + 1) ** 0.5
