"""The forward (noising) process of DDPM: the one-step chain and its closed form.

Ho et al. 2020 define the forward process as a Markov chain that adds a little Gaussian noise at
each step,

    q(x_t | x_{t-1}) = N(x_t; √(1 - β_t) x_{t-1}, β_t I)                      (eq. 2)

and show that t steps of it collapse into one Gaussian,

    q(x_t | x_0) = N(x_t; √ᾱ_t x_0, (1 - ᾱ_t) I),   ᾱ_t = ∏_{s≤t} (1 - β_s)   (eq. 4)

so training can jump to any t in one draw. Lesson 01 checks that the two agree.
Code timesteps run 0 … T-1: ``forward_chain(…, t)`` applies steps 0, 1, …, t (t + 1 steps).
"""

from __future__ import annotations

import torch

from .prediction import training_target
from .schedules import NoiseSchedule


def q_step(x_prev: torch.Tensor, noise: torch.Tensor, beta_t: float | torch.Tensor) -> torch.Tensor:
    """One step of the chain, eq. (2): x_t = √(1 - β_t) x_{t-1} + √β_t ε.

    Args:
        x_prev: x_{t-1}, (B, C, H, W).
        noise: ε ~ N(0, I), same shape as ``x_prev``.
        beta_t: β_t, a float in (0, 1) or a tensor broadcastable to ``x_prev``.
    """
    if noise.shape != x_prev.shape:
        raise ValueError(f"noise must have the shape of x_prev {tuple(x_prev.shape)}, got {tuple(noise.shape)}.")
    beta_t = torch.as_tensor(beta_t, dtype=x_prev.dtype, device=x_prev.device)
    return (1 - beta_t).sqrt() * x_prev + beta_t.sqrt() * noise


def q_mean_std(schedule: NoiseSchedule, x0: torch.Tensor, t: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean √ᾱ_t x_0 and standard deviation √(1 - ᾱ_t) of q(x_t | x_0), eq. (4)."""
    mean = schedule.gather(schedule.sqrt_alphas_cumprod, t, x0) * x0
    std = schedule.gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0)
    return mean, std


def q_sample(
    schedule: NoiseSchedule, x0: torch.Tensor, t: int | torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw x_t ~ q(x_t | x_0) in one jump (eq. 4); returns ``(x_t, noise)``, the ε used."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    return schedule.add_noise(x0, noise, t), noise


def forward_chain(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: int,
    generator: torch.Generator | None = None,
    return_all: bool = False,
) -> torch.Tensor:
    """Run the chain of eq. (2) from x_0 through steps 0 … t, drawing fresh noise at each step.

    Returns x_t, or with ``return_all`` every state, (t + 2, *x0.shape): x_0, then after each step.
    """
    t = int(schedule.check_timesteps(t))
    x, states = x0, [x0]
    for s in range(t + 1):
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x = q_step(x, noise, schedule.betas[s])
        if return_all:
            states.append(x)
    return torch.stack(states) if return_all else x


def ddpm_loss(
    model: torch.nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, generator: torch.Generator | None = None,
    prediction_type: str = "epsilon", snr_gamma: float | None = None,
) -> torch.Tensor:
    """The simple ε-prediction loss of DDPM (Ho et al. 2020, eq. 14; Algorithm 1, Training):

        L_simple = E_{t, x_0, ε} ‖ε - ε_θ(√ᾱ_t x_0 + √(1 - ᾱ_t) ε, t)‖²

    with t uniform over the T steps and ε ~ N(0, I): noise x_0 to a random t in one jump (eq. 4),
    ask the model which noise was added, and score it by mean squared error.

    Args:
        model: ε_θ, called as ``model(x_t, t)`` and returning ε_pred with the shape of x_t.
        schedule: supplies ᾱ_t and T (``num_train_timesteps``).
        x0: x_0, clean images (B, C, H, W) in [-1, 1].
        generator: draws t and ε, for reproducible training.
        prediction_type: what the model learns to output: "epsilon" (the loss above), "sample" (x_0) or
            "v_prediction" (v = √ᾱ_t ε − √(1 − ᾱ_t) x_0, Salimans & Ho 2022, as SD 2.x); same draws.
        snr_gamma: γ of Min-SNR-γ weighting (Hang et al. 2023; γ = 5 is their default): each sample's
            error is weighted by min(SNR_t, γ) / SNR_t for ε, min(SNR_t, γ) for x_0 and min(SNR_t, γ) /
            (SNR_t + 1) for v, SNR_t = ᾱ_t / (1 − ᾱ_t). All three then weight the x_0 error by min(SNR_t, γ):
            the nearly clean, easy timesteps stop dominating the gradient. None (default): unweighted, as DDPM.
    Returns:
        A scalar: the mean over batch and pixels.
    """
    if snr_gamma is not None and not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be > 0 (Hang et al. use 5), or None for the unweighted loss; got snr_gamma={snr_gamma!r}.")
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)  # (B,)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)  # ε, (B, C, H, W)
    x_t = schedule.add_noise(x0, noise, t)
    alpha_bar = schedule.gather(schedule.alphas_cumprod, t, x0)  # (B, 1, 1, 1)
    target = training_target(x0, noise, alpha_bar, prediction_type)  # ε for SD v1
    if snr_gamma is None:
        return torch.nn.functional.mse_loss(model(x_t, t), target)
    snr = schedule.gather(schedule.snr, t, x0).flatten()  # SNR_t = ᾱ_t / (1 - ᾱ_t), (B,)
    weight = snr.clamp(max=snr_gamma) / {"epsilon": snr, "sample": torch.ones_like(snr), "v_prediction": snr + 1}[prediction_type]
    per_sample = (model(x_t, t) - target).square().flatten(1).mean(1)  # (B,)
    return (weight.to(per_sample.dtype) * per_sample).mean()
