"""Samplers: six ways to run an ε-prediction model from noise x_T back to an image x_0.

Each sampler is one pure *step function* (a lesson-04 exercise) plus one shared loop, ``sample``.
Two coordinate systems appear, and every step function says which it uses:

* **DDPM scale** (``ddpm``, ``ddim``, ``dpmpp_2m``): x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε, what the model sees.
* **σ-space** (``euler``, ``euler_ancestral``, ``heun``; Karras et al. 2022): x̄ = x_t / √ᾱ_t = x_0 + σ ε
  with σ = √((1 - ᾱ_t) / ᾱ_t) (``NoiseSchedule.sigmas``). The probability-flow ODE is then simply
  dx̄/dσ = (x̄ - D(x̄; σ)) / σ = ε̂, where D(x̄; σ) = x̄ - σ ε̂ is the predicted x_0 (Karras eq. 3).

Notation: DDIM's α_t is DDPM's ᾱ_t; DPM-Solver's α_t and σ_t are √ᾱ_t and √(1 - ᾱ_t), its λ_t is
log(α_t / σ_t) = -log σ. We write ᾱ and σ-space's σ throughout.

Every sampler reproduces its diffusers scheduler step for step (tests/test_samplers.py), with one
grid of integer timesteps for all six, ``NoiseSchedule.inference_timesteps``. Where diffusers differs:
DPMSolverMultistep's own "leading" grid uses T // (n + 1); the σ-space schedulers' "linspace" keeps
fractional t; and DDIMScheduler steps to t - T // n, off the grid for "trailing"/"linspace" when n
does not divide T. We always step to the next grid point (identical for "leading", and when n | T).
``prediction_type`` (x_0- and v-models: ``minisd.prediction``) and ``use_karras_sigmas`` (``minisd.sigmas``) too.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .prediction import check_prediction_type, to_epsilon
from .schedules import NoiseSchedule
from .sigmas import KARRAS_SAMPLERS, SIGMA_SPACE_SAMPLERS, inference_sigmas, init_noise_sigma, sampling_grid  # noqa: F401

SAMPLERS = ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m")
SD_SET_ALPHA_TO_ONE = False  # SD v1 scheduler config: DDIM's last step lands on ᾱ_0, not on ᾱ = 1

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, …), t (B,) long) -> ε̂ (B, …)
# (step index i, timestep t, x after the step on the DDPM scale) -> None, or a replacement for x
Callback = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]


# --- DDPM and DDIM: steps on the DDPM scale, between training timesteps t -> t_prev ---------------


def _alpha_bar(schedule: NoiseSchedule, t: int, final_alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """ᾱ_t for t in [0, T-1]; t = -1 means past the end of the chain and gives ``final_alpha_bar``."""
    if not -1 <= t < schedule.num_train_timesteps:
        raise ValueError(f"timestep must lie in [-1, {schedule.num_train_timesteps - 1}] (-1: end of chain), got {t}.")
    return schedule.alphas_cumprod[t] if t >= 0 else torch.as_tensor(final_alpha_bar, dtype=torch.float32)


def ddpm_step(
    schedule: NoiseSchedule, eps_pred: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One ancestral step of DDPM (Ho et al. 2020): draw x_{t_prev} ~ p(x_{t_prev} | x_t).

        x0_pred = (x_t - √(1 - ᾱ_t) ε̂) / √ᾱ_t                                           (eq. 15)
        x_prev  = √ᾱ_prev β_t / (1 - ᾱ_t) · x0_pred + √α_t (1 - ᾱ_prev) / (1 - ᾱ_t) · x_t + σ_t z  (eq. 7)
        σ_t²    = β̃_t = (1 - ᾱ_prev) / (1 - ᾱ_t) · β_t                     (eq. 7; diffusers' fixed_small)

    which is eq. 11 rewritten through x0_pred. With skipped timesteps, α_t = ᾱ_t / ᾱ_prev and
    β_t = 1 - α_t are those of the whole jump. No clipping of x0_pred: SD sets ``clip_sample=False``.

    Args:
        eps_pred: ε̂ = model(x_t, t), (B, C, H, W).
        x_t: the current sample, (B, C, H, W).
        t, t_prev: the current timestep and the next (smaller) one; t_prev = -1 ends the chain at ᾱ = 1.
        noise: z ~ N(0, I) like ``x_t``; None adds no noise (the posterior mean). Algorithm 2 uses z = 0 at t = 0.
    """
    alpha_bar_t, alpha_bar_prev = _alpha_bar(schedule, t, 1.0), _alpha_bar(schedule, t_prev, 1.0)
    alpha_t = alpha_bar_t / alpha_bar_prev  # one jump t -> t_prev, as if it were a single DDPM step
    beta_t = 1 - alpha_t
    x0_pred = (x_t - (1 - alpha_bar_t) ** 0.5 * eps_pred) / alpha_bar_t**0.5
    x0_coef = alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)
    x_t_coef = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    x_prev = x0_coef * x0_pred + x_t_coef * x_t
    if noise is not None:
        posterior_variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t  # β̃_t
        x_prev = x_prev + posterior_variance**0.5 * noise
    return x_prev


def ddim_step(
    schedule: NoiseSchedule, eps_pred: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int,
    eta: float = 0.0, noise: torch.Tensor | None = None, set_alpha_to_one: bool = SD_SET_ALPHA_TO_ONE,
) -> torch.Tensor:
    """One DDIM step (Song et al. 2021), deterministic for η = 0:

        x_prev = √ᾱ_prev · x0_pred + √(1 - ᾱ_prev - σ_t²) · ε̂ + σ_t z,  x0_pred as in ``ddpm_step``  (eq. 12)
        σ_t = η √((1 - ᾱ_prev) / (1 - ᾱ_t)) √(1 - ᾱ_t / ᾱ_prev)                                (eq. 16)

    η = 1 gives σ_t² = β̃_t and the DDPM step itself. For η = 0 the update is an ODE step and runs
    either way: ``ddim_invert`` calls it with t_prev > t.

    Args:
        eps_pred: ε̂ = model(x_t, t), (B, C, H, W).
        x_t: the current sample, (B, C, H, W).
        t, t_prev: timestep of x_t and the one to move to; -1 means the end of the chain, where
            ᾱ = 1 if ``set_alpha_to_one`` else ᾱ_0 (diffusers' ``final_alpha_cumprod``; SD uses ᾱ_0).
        eta: η in [0, 1]. noise: z ~ N(0, I) like ``x_t``, needed when η > 0.
    """
    if eta > 0 and noise is None:
        raise ValueError(f"ddim_step with eta={eta} > 0 adds noise σ_t z: pass noise=torch.randn_like(x_t).")
    final_alpha_bar = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
    alpha_bar_t = _alpha_bar(schedule, t, final_alpha_bar)
    alpha_bar_prev = _alpha_bar(schedule, t_prev, final_alpha_bar)
    x0_pred = (x_t - (1 - alpha_bar_t) ** 0.5 * eps_pred) / alpha_bar_t**0.5
    sigma_t = torch.zeros(())  # skipping eq. 16 at η = 0 also spares inversion a 0/0 when ᾱ_t = 1
    if eta > 0:
        sigma_t = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)) ** 0.5
    x_prev = alpha_bar_prev**0.5 * x0_pred + (1 - alpha_bar_prev - sigma_t**2) ** 0.5 * eps_pred
    if eta > 0:
        x_prev = x_prev + sigma_t * noise
    return x_prev


# --- Euler, Euler ancestral, Heun: steps of the ODE dx̄/dσ = ε̂ in σ-space (Karras et al. 2022) ---


def _derivative(x: torch.Tensor, eps_pred: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """d = (x̄ - D(x̄; σ)) / σ with D = x̄ - σ ε̂ (Karras Algorithm 1, line 4). Equal to ε̂ up to
    rounding; written through D as the paper (and diffusers) do, so both round the same way."""
    x0_pred = x - sigma * eps_pred
    return (x - x0_pred) / sigma


def euler_step(
    x: torch.Tensor, eps_pred: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One Euler step of the ODE in σ-space: x̄_next = x̄ + (σ_next - σ) d (Karras Algorithm 1, line 5, no churn).

    Args:
        x: x̄ = x_t / √ᾱ_t, (B, C, H, W). eps_pred: ε̂ = model(x̄ / √(σ² + 1), t), same shape.
        sigma, sigma_next: σ now and after the step (0 at the end), 0-dim tensors or floats.
    """
    return x + _derivative(x, eps_pred, sigma) * (sigma_next - sigma)


def euler_ancestral_step(
    x: torch.Tensor, eps_pred: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Euler down to σ_down, then fresh noise of std σ_up, with σ_down² + σ_up² = σ_next²:

        σ_up = √(σ_next² (σ² - σ_next²) / σ²),   σ_down = √(σ_next² - σ_up²)
        x̄_next = x̄ + (σ_down - σ) d + σ_up z

    (Crowson's k-diffusion ``sample_euler_ancestral``; σ_up is DDPM's posterior std in σ-space, so this
    is the ancestral sampler of Ho et al. written as an ODE step plus noise.) Arguments as ``euler_step``;
    noise: z ~ N(0, I) like ``x``.
    """
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return x + _derivative(x, eps_pred, sigma) * (sigma_down - sigma) + noise * sigma_up


def heun_step(
    x: torch.Tensor, eps_pred: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
    eps_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """One step of Heun's 2nd-order method (Karras Algorithm 1, lines 5-8, no churn):

        x̃ = x̄ + (σ_next - σ) d,   d' = (x̃ - D(x̃; σ_next)) / σ_next,   x̄_next = x̄ + (σ_next - σ)(d + d')/2

    The last step (σ_next = 0) has no d' and stays an Euler step, so n steps cost 2n - 1 model calls.
    Arguments as ``euler_step``; ``eps_fn`` maps x̃ to ε̂ at σ_next (the model at the next timestep).
    """
    d = _derivative(x, eps_pred, sigma)
    x_euler = x + d * (sigma_next - sigma)
    if sigma_next == 0:  # Algorithm 1, line 6: dividing by σ_next = 0 is impossible
        return x_euler
    d_next = _derivative(x_euler, eps_fn(x_euler), sigma_next)
    return x + (d + d_next) / 2 * (sigma_next - sigma)


# --- DPM-Solver++(2M): a multistep solver on the DDPM scale, in λ = -log σ (Lu et al. 2022) -------


def _sqrt_alpha_bars(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(√ᾱ, √(1 - ᾱ)) = (1 / √(σ² + 1), σ / √(σ² + 1)): DPM-Solver's (α_t, σ_t) from σ-space's σ."""
    sigma = torch.as_tensor(sigma)  # a float works too; torch.log below needs a tensor
    sqrt_alpha_bar = 1 / (sigma**2 + 1) ** 0.5
    return sqrt_alpha_bar, sigma * sqrt_alpha_bar


def _log_snr_half(sigma: torch.Tensor) -> torch.Tensor:
    """λ = log(α_t / σ_t) = log √ᾱ - log √(1 - ᾱ), half the log-SNR; equal to -log σ."""
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar = _sqrt_alpha_bars(sigma)
    return torch.log(sqrt_alpha_bar) - torch.log(sqrt_one_minus_alpha_bar)


def dpm_x0_pred(x_t: torch.Tensor, eps_pred: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0_pred = (x_t - √(1 - ᾱ) ε̂) / √ᾱ (DDPM eq. 15), with ᾱ given through σ as DPM-Solver does."""
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar = _sqrt_alpha_bars(sigma)
    return (x_t - sqrt_one_minus_alpha_bar * eps_pred) / sqrt_alpha_bar


def dpmpp_2m_step(
    x_t: torch.Tensor, x0_pred: torch.Tensor, x0_pred_prev: torch.Tensor | None,
    sigma_prev: torch.Tensor | None, sigma: torch.Tensor, sigma_next: torch.Tensor,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step (Lu et al. 2022, "DPM-Solver++", Algorithm 2), with λ = -log σ:

        h = λ_next - λ,   r = (λ - λ_prev) / h,   D = (1 + 1/(2r)) x0_pred - 1/(2r) x0_pred_prev
        x_next = √(1 - ᾱ_next) / √(1 - ᾱ) · x_t - √ᾱ_next (e^{-h} - 1) D

    Without a previous x0_pred (the first step) D = x0_pred: the first-order step, which is DDIM.
    At σ_next = 0 the step returns x0_pred; diffusers' defaults (``final_sigmas_type="zero"``,
    ``lower_order_final=True``) also take that last step first-order.

    Args:
        x_t: the current sample on the DDPM scale, (B, C, H, W).
        x0_pred, x0_pred_prev: D(x; σ) now and at the previous step (None on the first step).
        sigma_prev, sigma, sigma_next: σ-space σ's of the previous, current and next timestep.
    """
    if sigma_next == 0:  # e^{-h} = 0 and σ_next / σ = 0: only the data prediction is left
        return x0_pred
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar = _sqrt_alpha_bars(sigma)
    sqrt_alpha_bar_next, sqrt_one_minus_alpha_bar_next = _sqrt_alpha_bars(sigma_next)
    lambda_t, lambda_next = _log_snr_half(sigma), _log_snr_half(sigma_next)
    h = lambda_next - lambda_t
    phi = sqrt_alpha_bar_next * (torch.exp(-h) - 1.0)
    x_next = (sqrt_one_minus_alpha_bar_next / sqrt_one_minus_alpha_bar) * x_t - phi * x0_pred
    if x0_pred_prev is None:
        return x_next
    r = (lambda_t - _log_snr_half(sigma_prev)) / h  # h_{i-1} / h_i
    # diffusers' form of the same D: D0 = x0_pred, D1 = (x0_pred - x0_pred_prev) / r, D = D0 + D1 / 2
    return x_next - 0.5 * phi * ((1.0 / r) * (x0_pred - x0_pred_prev))


# --- The loop -------------------------------------------------------------------------------------


def count_model_evaluations(sampler: str, num_inference_steps: int, start_step: int = 0) -> int:
    """Number of model calls (NFE) ``sample`` makes: one per step, Heun 2 per step except the last."""
    _check_choice("sampler", sampler, SAMPLERS)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int ≥ 1, got {num_inference_steps!r}.")
    _check_start_step(start_step, num_inference_steps)
    steps = num_inference_steps - start_step
    return 2 * steps - 1 if sampler == "heun" else steps


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; use one of {choices}.")


def _check_start_step(start_step: int, num_inference_steps: int) -> None:
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step < num_inference_steps:
        raise ValueError(f"start_step must be an int in [0, {num_inference_steps - 1}] (num_inference_steps - 1), "
                         f"got {start_step!r}.")


def _check_sample_args(name: str, x: torch.Tensor, sampler: str, eta: float, steps_offset: int, generator,
                       prediction_type: str) -> None:
    """ValueErrors, naming the argument, for what ``inference_timesteps`` does not check itself."""
    _check_choice("sampler", sampler, SAMPLERS)
    check_prediction_type(prediction_type)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor (B, C, H, W) (or any (B, …)), got {got}.")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's variance), got {eta!r}.")
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta={eta} only applies to sampler='ddim', not {sampler!r}; leave eta=0.0.")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an int ≥ 0 (SD uses 1), got {steps_offset!r}.")
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
        got = f"one on {generator.device}" if isinstance(generator, torch.Generator) else repr(generator)
        raise ValueError(f"generator must be None or a CPU torch.Generator (noise is drawn on the CPU), got {got}.")


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) like ``like``, drawn on the CPU then moved (diffusers' ``randn_tensor``): same seed, same picture anywhere."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


@torch.no_grad()
def sample(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    sampler: str = "ddim",
    num_inference_steps: int = 50,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
    start_step: int = 0,
    callback: Callback | None = None,
    progress: bool = True,
    prediction_type: str = "epsilon",
    use_karras_sigmas: bool = False,
) -> torch.Tensor:
    """Run ``sampler`` from x_T down to x_0 in ``num_inference_steps`` steps; returns x_0, (B, C, H, W)
    (for ``ddim`` with SD's config, the sample at ᾱ_0 ≈ 0.999, as diffusers returns it).

    Args:
        model: model(x_t, t), x_t (B, C, H, W) on the DDPM scale, t a (B,) long tensor; returns ε̂, x0_pred or v̂ per
            ``prediction_type`` (``prediction.to_epsilon`` converts, with ᾱ_t for ddpm/ddim, else 1 / (σ_i² + 1)).
        x_T: unit-variance noise N(0, I), (B, C, H, W); σ-space samplers scale it by ``init_noise_sigma``.
            With ``start_step = k`` (img2img) pass instead x_t at step k on the DDPM scale,
            ``schedule.add_noise(x_0, noise, timesteps[k])`` with ``timesteps, sigmas = sampling_grid(…)``
            (with Karras σ's: √ᾱ x_0 + √(1 - ᾱ) noise, ᾱ = 1 / (sigmas[k]² + 1)).
        sampler: one of ``SAMPLERS``. eta: DDIM's η (``sampler="ddim"`` only).
        generator: CPU generator for all noise drawn (ddpm, ddim with η > 0, euler_ancestral).
        timestep_spacing, steps_offset: the timesteps, as ``NoiseSchedule.inference_timesteps`` (SD: leading, 1).
        callback: called as ``callback(i, t, x)`` after step i (taken at timestep t = timesteps[i]). x is
            the new state on the DDPM scale, at timestep timesteps[i + 1] (after the last step: the
            result); σ-space states are divided by √(σ² + 1) so all samplers' trajectories compare.
            **It may return a replacement for x**, on the same DDPM scale and at the same timestep
            (None keeps x): the sampler carries on from it, rescaled to its own coordinates. This is how
            inpainting pastes the re-noised known region back at every step (Blended Latent Diffusion).
        progress: show a tqdm bar. use_karras_sigmas: Karras et al.'s σ spacing (eq. 5, ρ = 7) for
            ``KARRAS_SAMPLERS``, as diffusers' ``use_karras_sigmas=True`` (``sigmas.sampling_grid``).
    """
    _check_sample_args("x_T", x_T, sampler, eta, steps_offset, generator, prediction_type)
    timesteps, sigmas = sampling_grid(schedule, sampler, num_inference_steps, timestep_spacing, steps_offset, use_karras_sigmas)
    _check_start_step(start_step, num_inference_steps)
    sigma_space = sampler in SIGMA_SPACE_SAMPLERS
    # ᾱ per step for to_epsilon, as the step's formulas use it: ᾱ_t, or 1 / (σ_i² + 1) in float64 (keeps √(1 - ᾱ) exact)
    alpha_bars = schedule.alphas_cumprod[timesteps] if sampler in ("ddpm", "ddim") else 1 / (sigmas[:-1].double() ** 2 + 1)
    x = x_T  # σ-space: unit noise times init_noise_sigma, or img2img's x_t (DDPM scale) as x̄ = x_t √(σ² + 1)
    if sigma_space:
        x = x_T * (init_noise_sigma(sigmas, timestep_spacing) if start_step == 0 else (sigmas[start_step] ** 2 + 1) ** 0.5)

    def eps_at(x_in: torch.Tensor, i: int) -> torch.Tensor:
        """ε̂ at step i; σ-space inputs go back to the DDPM scale (diffusers' ``scale_model_input``)."""
        t = torch.full((x_in.shape[0],), int(timesteps[i]), dtype=torch.long, device=x_in.device)
        x_t = x_in / (sigmas[i] ** 2 + 1) ** 0.5 if sigma_space else x_in
        model_output = model(x_t, t)
        if model_output.shape != x_in.shape:
            got = tuple(model_output.shape)
            raise ValueError(f"model must return ε̂ with the shape of x_t {tuple(x_in.shape)} (or x0_pred, v̂: "
                             f"prediction_type={prediction_type!r}), got {got}.")
        return to_epsilon(model_output, x_t, alpha_bars[i], prediction_type)

    x0_pred_prev = None  # DPM-Solver++(2M)'s memory of the previous step
    for i in tqdm(range(start_step, num_inference_steps), desc=sampler, disable=not progress):
        t, t_prev = int(timesteps[i]), int(timesteps[i + 1]) if i + 1 < num_inference_steps else -1
        eps_pred = eps_at(x, i)
        if sampler == "ddpm":
            x = ddpm_step(schedule, eps_pred, x, t, t_prev, noise=_randn(x, generator) if t > 0 else None)
        elif sampler == "ddim":
            x = ddim_step(schedule, eps_pred, x, t, t_prev, eta, noise=_randn(x, generator) if eta > 0 else None)
        elif sampler == "euler":
            x = euler_step(x, eps_pred, sigmas[i], sigmas[i + 1])
        elif sampler == "euler_ancestral":
            x = euler_ancestral_step(x, eps_pred, sigmas[i], sigmas[i + 1], _randn(x, generator))
        elif sampler == "heun":
            x = heun_step(x, eps_pred, sigmas[i], sigmas[i + 1], lambda x_euler: eps_at(x_euler, i + 1))
        else:  # dpmpp_2m
            x0_pred = dpm_x0_pred(x, eps_pred, sigmas[i])
            sigma_prev = sigmas[i - 1] if x0_pred_prev is not None else None
            x = dpmpp_2m_step(x, x0_pred, x0_pred_prev, sigma_prev, sigmas[i], sigmas[i + 1])
            x0_pred_prev = x0_pred
        if callback is not None:
            x = _apply_callback(callback, i, t, x, (sigmas[i + 1] ** 2 + 1) ** 0.5 if sigma_space else None)
    return x


def _apply_callback(callback: Callback, i: int, t: int, x: torch.Tensor, sigma_scale: torch.Tensor | None) -> torch.Tensor:
    """Show the callback x on the DDPM scale; take back its replacement, if any, in the sampler's coordinates."""
    replacement = callback(i, t, x / sigma_scale if sigma_scale is not None else x)
    if replacement is None:
        return x
    if not isinstance(replacement, torch.Tensor) or replacement.shape != x.shape:
        got = tuple(replacement.shape) if isinstance(replacement, torch.Tensor) else type(replacement).__name__
        raise ValueError(f"callback must return None or a replacement for x with shape {tuple(x.shape)}, got {got}.")
    replacement = replacement.to(device=x.device, dtype=x.dtype)
    return replacement * sigma_scale if sigma_scale is not None else replacement


@torch.no_grad()
def ddim_invert(
    model: Model, x0: torch.Tensor, schedule: NoiseSchedule, num_inference_steps: int = 50,
    timestep_spacing: str = "leading", steps_offset: int = 1, callback: Callback | None = None, progress: bool = True,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """DDIM inversion: run the η = 0 ODE of eq. 12 forwards, x_0 -> x_T, on the timesteps ``sample`` visits.

    Each step moves from timestep s to the next larger t with ``ddim_step(…, s, t)`` and ε̂ = model(x_s, t):
    the model is evaluated at the target t, approximating ε̂(x_t, t) by ε̂(x_s, t), as diffusers'
    ``DDIMInverseScheduler`` does. ``sample(model, x_T, …, sampler="ddim")`` with the same settings
    then reconstructs x0 up to that approximation. x0: (B, C, H, W), images in [-1, 1] or latents. An x_0- or
    v-model's output is converted with ᾱ_s, the level x_s is at (as ``DDIMInverseScheduler``).
    """
    _check_sample_args("x0", x0, "ddim", 0.0, steps_offset, None, prediction_type)
    final_alpha_bar = 1.0 if SD_SET_ALPHA_TO_ONE else schedule.alphas_cumprod[0]  # ddim_step's default
    timesteps = schedule.inference_timesteps(num_inference_steps, timestep_spacing, steps_offset)
    levels = [-1] + timesteps.flip(0).tolist()  # -1 = x0 itself, at DDIM's final ᾱ (SD: ᾱ_0)
    x = x0
    for i in tqdm(range(num_inference_steps), desc="ddim_invert", disable=not progress):
        s, t = levels[i], levels[i + 1]
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps_pred = to_epsilon(model(x, t_batch), x, _alpha_bar(schedule, s, final_alpha_bar), prediction_type)
        x = ddim_step(schedule, eps_pred, x, s, t)
        if callback is not None:
            callback(i, t, x)
    return x
