"""Noise schedules: how much noise the forward process adds at each of the T training steps.

Notation (DDPM, Ho et al. 2020; code index ``t`` runs 0 … T-1, the paper's t runs 1 … T):

* β_t  ``betas``                    variance added at step t, eq. (2)
* α_t  ``alphas`` = 1 - β_t
* ᾱ_t  ``alphas_cumprod`` = ∏_{s≤t} α_s, so that q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I), eq. (4)
* SNR(t) ``snr`` = ᾱ_t / (1 - ᾱ_t), the signal-to-noise ratio (Kingma et al. 2021)
* σ_t  ``sigmas`` = √((1 - ᾱ_t) / ᾱ_t), the noise level of x_t / √ᾱ_t (Karras et al. 2022); σ² = 1/SNR.
  ``NoiseSchedule.sigma_to_timestep`` maps any σ back to a (fractional) training timestep.

DDIM's paper writes α_t for DDPM's ᾱ_t: we always spell ᾱ ``alpha_bar`` / ``alphas_cumprod``.
Betas are built in float32 exactly as diffusers' schedulers build them, so ours equal theirs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

DDPM_BETA_START, DDPM_BETA_END = 1e-4, 0.02  # Ho et al. 2020, section 4 (also diffusers' default)
SD_BETA_START, SD_BETA_END = 0.00085, 0.012  # Stable Diffusion v1 scheduler config
COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal 2021, eq. (17): keeps β_0 from being tiny
MAX_BETA = 0.999  # same paper: clip β_t so the last steps do not divide by ᾱ ≈ 0


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """β_t evenly spaced from ``beta_start`` to ``beta_end`` (DDPM). Shape (T,)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """√β_t evenly spaced, then squared: Stable Diffusion's schedule. Shape (T,)."""
    sqrt_betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32)
    return sqrt_betas**2


def cosine_alpha_bar(t: float, s: float = COSINE_OFFSET) -> float:
    """ᾱ(t) = cos²(((t + s) / (1 + s)) · π/2) for t ∈ [0, 1] (Nichol & Dhariwal 2021, eq. 17, unnormalised)."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_train_timesteps: int, max_beta: float = MAX_BETA) -> torch.Tensor:
    """β_t = 1 - ᾱ(t+1)/ᾱ(t) from the cosine ᾱ, clipped at ``max_beta`` (diffusers' squaredcos_cap_v2)."""
    n = num_train_timesteps
    betas = [min(1 - cosine_alpha_bar((i + 1) / n) / cosine_alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


class NoiseSchedule:
    """The β_t of a forward process and every quantity derived from them (see the module notation).

    Arguments follow diffusers' ``DDPMScheduler``. ``beta_schedule`` is one of ``BETA_SCHEDULES``;
    ``"cosine"`` is the course's short name for ``"squaredcos_cap_v2"`` (which ignores
    ``beta_start`` / ``beta_end``). ``NoiseSchedule.stable_diffusion()`` gives SD v1's schedule.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = DDPM_BETA_START,
        beta_end: float = DDPM_BETA_END,
        beta_schedule: str = "linear",
    ) -> None:
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an int ≥ 2, got {num_train_timesteps!r}.")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={beta_schedule!r} is unknown; use one of {BETA_SCHEDULES}.")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start ≤ beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}.")
        self.num_train_timesteps = num_train_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.beta_schedule = "squaredcos_cap_v2" if beta_schedule == "cosine" else beta_schedule

        if self.beta_schedule == "linear":
            self.betas = linear_betas(num_train_timesteps, beta_start, beta_end)
        elif self.beta_schedule == "scaled_linear":
            self.betas = scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
        else:
            self.betas = cosine_betas(num_train_timesteps)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self.sigmas = (1.0 / self.snr).sqrt()

    @classmethod
    def stable_diffusion(cls) -> "NoiseSchedule":
        """Stable Diffusion v1's schedule: scaled-linear from 0.00085 to 0.012 over 1000 steps."""
        return cls(1000, SD_BETA_START, SD_BETA_END, "scaled_linear")

    def __repr__(self) -> str:
        extra = "" if self.beta_schedule == "squaredcos_cap_v2" else f", beta_start={self.beta_start}, beta_end={self.beta_end}"
        return f"NoiseSchedule({self.beta_schedule!r}, num_train_timesteps={self.num_train_timesteps}{extra})"

    def check_timesteps(self, t: int | torch.Tensor) -> torch.Tensor:
        """``t`` as a long tensor, or a ValueError naming the accepted range [0, T-1]."""
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t must hold integer timesteps, got dtype {t.dtype}.")
        if t.numel() and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(
                f"t must lie in [0, {self.num_train_timesteps - 1}] (num_train_timesteps={self.num_train_timesteps}), "
                f"got values from {int(t.min())} to {int(t.max())}."
            )
        return t.long()

    def gather(self, values: torch.Tensor, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` shaped to broadcast against ``like`` (B, …): a scalar, or (B, 1, 1, …)."""
        t = self.check_timesteps(t)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != like.shape[0]):
            raise ValueError(
                f"t must be a single timestep or one per batch item, shape ({like.shape[0]},); got shape {tuple(t.shape)}."
            )
        out = values.to(like.device)[t.to(like.device)].to(like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim == 1 else out

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) in closed form: x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε  (DDPM eq. 4).

        Args:
            x0: x_0, clean images (B, C, H, W) in [-1, 1].
            noise: ε ~ N(0, I), same shape as ``x0``.
            t: timestep(s) in [0, T-1]: an int, or a long tensor of shape (B,).
        """
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}.")
        return self.gather(self.sqrt_alphas_cumprod, t, x0) * x0 + self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def inference_timesteps(
        self, num_inference_steps: int, timestep_spacing: str = "leading", steps_offset: int = 0
    ) -> torch.Tensor:
        """The ``num_inference_steps`` training timesteps a sampler visits, noisiest first.

        ``timestep_spacing`` (as diffusers' DDIM scheduler; Lin et al. 2024, table 2):
        ``"leading"`` = 0, k, 2k, … (k = T // n) plus ``steps_offset`` (SD uses 1);
        ``"trailing"`` = T-1, T-1-k, … (always starts at the last, noisiest step);
        ``"linspace"`` = n points evenly spread over [0, T-1], rounded.
        """
        n, T = num_inference_steps, self.num_train_timesteps
        if not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an int in [1, {T}] (num_train_timesteps), got {n!r}.")
        if timestep_spacing == "leading":
            steps = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
            if steps[0] > T - 1:  # e.g. all T steps with SD's offset of 1: the first would be t = T
                raise ValueError(f"num_inference_steps={n} with timestep_spacing='leading' and steps_offset="
                                 f"{steps_offset} starts at t = {steps[0]}, past the last training step {T - 1}: "
                                 "use steps_offset=0, timestep_spacing='trailing', or fewer steps.")
        elif timestep_spacing == "trailing":
            steps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        elif timestep_spacing == "linspace":
            steps = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        else:
            raise ValueError(f"timestep_spacing={timestep_spacing!r} is unknown; use one of {TIMESTEP_SPACINGS}.")
        return self.check_timesteps(torch.from_numpy(steps.copy()))

    def sigma_to_timestep(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The fractional training timestep t at which σ(t) = σ, for each σ: log σ interpolated linearly between
        neighbouring training timesteps (diffusers' ``_sigma_to_t``, k-diffusion's ``sigma_to_t``), clamped to
        [0, T-1]. σ = 0 maps to 0. Computed as diffusers does (float32 log σ table, float64 arithmetic).

        Args:
            sigmas: σ-space noise levels, any shape. Returns: t of the same shape, float64.
        """
        alpha_bar = self.alphas_cumprod
        log_sigmas = np.log((((1 - alpha_bar) / alpha_bar) ** 0.5).numpy())  # (T,) float32, increasing in t
        log_sigma = np.log(np.maximum(torch.as_tensor(sigmas, dtype=torch.float64).numpy(), 1e-10))
        low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
        high = low + 1  # the last timestep with log σ_t ≤ log σ, and the next one
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
        return torch.from_numpy((1 - w) * low + w * high)
