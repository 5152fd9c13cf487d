"""Self-checks for the lessons' exercises.

Each ``check_<name>(fn)`` calls the learner's ``fn`` on a few fixed inputs and compares the result
with minisd's reference implementation:

* correct  -> prints a short confirmation and returns ``fn`` (the lesson goes on with your code);
* a stub   -> (``fn`` raises ``NotImplementedError``) says so and returns the reference, so the
  rest of the lesson still runs;
* wrong    -> raises ``ExerciseError`` saying on which input, what was expected and what came back.

Use it as ``add_noise = check_add_noise(add_noise)`` in the cell after the exercise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import diffusion, samplers, schedules
from .nn import embeddings
from .schedules import NoiseSchedule


class ExerciseError(AssertionError):
    """Raised when an exercise's answer disagrees with the reference."""


@dataclass
class Case:
    """One input to try: keyword arguments and how to describe them to a learner."""

    kwargs: dict[str, Any]
    label: str


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.numel() <= 8:
            return f"tensor({value.tolist()})"
        return f"tensor of shape {tuple(value.shape)}"
    if isinstance(value, NoiseSchedule):
        return repr(value)
    return repr(value)


def _inputs(case: Case) -> str:
    args = ", ".join(f"{k}={_describe(v)}" for k, v in case.kwargs.items())
    return f"{case.label}: ({args})"


def _compare(name: str, case: Case, expected: torch.Tensor, got: Any, atol: float, rtol: float) -> None:
    where = f"`{name}` on input {_inputs(case)}"
    if got is None:
        raise ExerciseError(f"{where} returned None: did you forget the `return`?")
    try:
        got = torch.as_tensor(got)
    except Exception as error:  # noqa: BLE001 - any non-tensor answer gets the same message
        raise ExerciseError(f"{where} returned a {type(got).__name__}, expected a tensor.") from error
    if got.shape != expected.shape:
        raise ExerciseError(
            f"{where} returned shape {tuple(got.shape)}, expected {tuple(expected.shape)}.\n"
            "Hint: check broadcasting: a per-item value needs shape (B, 1, 1, 1) to multiply images (B, C, H, W)."
        )
    got_f, expected_f = got.detach().cpu().double(), expected.detach().cpu().double()
    if torch.allclose(got_f, expected_f, atol=atol, rtol=rtol):
        return
    error = (got_f - expected_f).abs()
    worst = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
    raise ExerciseError(
        f"{where} gives the wrong values.\n"
        f"  largest difference {error.max().item():.3g} at index {worst}: "
        f"expected {expected_f[worst].item():.6g}, got {got_f[worst].item():.6g}\n"
        f"  expected (first values): {expected_f.flatten()[:5].tolist()}\n"
        f"  got      (first values): {got_f.flatten()[:5].tolist()}"
    )


def _fresh(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The same inputs with every torch.Generator restarted, so each call draws the same numbers."""
    fresh = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Generator):
            value = torch.Generator(value.device).set_state(value.get_state())
        fresh[key] = value
    return fresh


def check(
    name: str,
    fn: Callable,
    reference: Callable,
    cases: list[Case],
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Callable:
    """Compare ``fn`` with ``reference`` on every case; see the module docstring for the outcomes."""
    for case in cases:
        expected = reference(**_fresh(case.kwargs))
        try:
            got = fn(**_fresh(case.kwargs))
        except NotImplementedError:
            print(f"📝 `{name}` is not written yet: using minisd's reference so the lesson can go on.")
            return reference
        except Exception as error:
            raise ExerciseError(
                f"`{name}` raised {type(error).__name__}: {error}\n  on input {_inputs(case)}"
            ) from error
        _compare(name, case, expected, got, atol, rtol)
    print(f"✅ `{name}` matches the reference on {len(cases)} inputs.")
    return fn


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- Lesson 01: forward diffusion ---------------------------------------------------------------


def check_q_step(fn: Callable) -> Callable:
    """Check ``fn(x_prev, noise, beta_t)``: one step of the forward chain (DDPM eq. 2)."""
    cases = [
        Case({"x_prev": _randn(2, 3, 8, 8, seed=1), "noise": _randn(2, 3, 8, 8, seed=2), "beta_t": beta}, label)
        for beta, label in [(1e-4, "tiny beta"), (0.02, "DDPM's last beta"), (0.5, "half noise")]
    ]
    cases.append(Case({"x_prev": torch.ones(1, 1, 2, 2), "noise": torch.zeros(1, 1, 2, 2), "beta_t": 0.36}, "no noise"))
    return check("q_step", fn, diffusion.q_step, cases)


def _reference_add_noise(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return schedule.add_noise(x0, noise, t)


def check_add_noise(fn: Callable) -> Callable:
    """Check ``fn(schedule, x0, noise, t)``: the closed form q(x_t | x_0) (DDPM eq. 4), one t per image."""
    x0, noise = _randn(4, 3, 8, 8, seed=3), _randn(4, 3, 8, 8, seed=4)
    cases = [
        Case({"schedule": NoiseSchedule(), "x0": x0, "noise": noise, "t": torch.tensor([0, 10, 500, 999])}, "linear"),
        Case({"schedule": NoiseSchedule.stable_diffusion(), "x0": x0, "noise": noise, "t": torch.tensor([999, 0, 250, 1])}, "SD"),
        Case({"schedule": NoiseSchedule(beta_schedule="cosine"), "x0": x0[:1], "noise": noise[:1], "t": torch.tensor([700])}, "cosine"),
    ]
    return check("add_noise", fn, _reference_add_noise, cases)


# --- Lesson 02: noise schedules -----------------------------------------------------------------


def check_scaled_linear_betas(fn: Callable) -> Callable:
    """Check ``fn(num_train_timesteps, beta_start, beta_end)``: Stable Diffusion's β_t."""
    cases = [
        Case({"num_train_timesteps": 1000, "beta_start": schedules.SD_BETA_START, "beta_end": schedules.SD_BETA_END}, "SD v1"),
        Case({"num_train_timesteps": 10, "beta_start": 0.01, "beta_end": 0.25}, "short"),
    ]
    return check("scaled_linear_betas", fn, schedules.scaled_linear_betas, cases, atol=1e-7, rtol=1e-5)


def check_cosine_betas(fn: Callable) -> Callable:
    """Check ``fn(num_train_timesteps)``: cosine-schedule β_t, clipped at 0.999 (Nichol & Dhariwal eq. 17)."""
    cases = [Case({"num_train_timesteps": n}, f"T={n}") for n in (1000, 50)]
    return check("cosine_betas", fn, schedules.cosine_betas, cases, atol=1e-6, rtol=1e-5)


def _reference_leading_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> torch.Tensor:
    return NoiseSchedule(num_train_timesteps).inference_timesteps(num_inference_steps, "leading", steps_offset)


def check_leading_timesteps(fn: Callable) -> Callable:
    """Check ``fn(num_inference_steps, num_train_timesteps, steps_offset)``: SD's "leading" spacing."""
    cases = [
        Case({"num_inference_steps": n, "num_train_timesteps": 1000, "steps_offset": off}, f"{n} steps")
        for n, off in [(15, 1), (30, 1), (50, 0), (7, 1)]
    ]
    return check("leading_timesteps", fn, _reference_leading_timesteps, cases, atol=0, rtol=0)


# --- Lesson 03: pixel-space DDPM ----------------------------------------------------------------


def _reference_timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    return embeddings.timestep_embedding(timesteps, dim)


def check_timestep_embedding(fn: Callable) -> Callable:
    """Check ``fn(timesteps, dim)``: SD's sinusoidal embedding, cosines first (flip_sin_to_cos)."""
    cases = [
        Case({"timesteps": torch.tensor([0, 1, 10, 500, 999]), "dim": 32}, "five timesteps"),
        Case({"timesteps": torch.tensor([3, 700]), "dim": 8}, "narrow"),
    ]
    # sin/cos of angles up to 999 rad: float32 rounding of the angle alone is ~1e-4
    return check("timestep_embedding", fn, _reference_timestep_embedding, cases, atol=2e-4, rtol=0)


def _toy_eps_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed stand-in for ε_θ: any deterministic function of (x_t, t) will do for checking a loss."""
    return 0.5 * torch.tanh(x_t) + (t.float() / 1000).reshape(-1, 1, 1, 1)


def _reference_ddpm_loss(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    return diffusion.ddpm_loss(model, schedule, x0, generator)


def check_ddpm_loss(fn: Callable) -> Callable:
    """Check ``fn(model, schedule, x0, generator)``: L_simple (DDPM eq. 14), t drawn before ε."""
    x0 = _randn(8, 1, 8, 8, seed=5).clamp(-1, 1)
    cases = [
        Case({"model": _toy_eps_model, "schedule": NoiseSchedule(), "x0": x0,
              "generator": torch.Generator().manual_seed(seed)}, f"seed {seed}")
        for seed in (0, 1)
    ]
    return check("ddpm_loss", fn, _reference_ddpm_loss, cases)


def _reference_ddpm_step(schedule: NoiseSchedule, eps_pred: torch.Tensor, x_t: torch.Tensor, t: int,
                         noise: torch.Tensor) -> torch.Tensor:
    return samplers.ddpm_step(schedule, eps_pred, x_t, t, t - 1, noise=noise)


def check_ddpm_step(fn: Callable) -> Callable:
    """Check ``fn(schedule, eps_pred, x_t, t, noise)``: one ancestral step t -> t-1 (DDPM eq. 11)."""
    x_t, eps, z = _randn(2, 1, 8, 8, seed=6), _randn(2, 1, 8, 8, seed=7), _randn(2, 1, 8, 8, seed=8)
    cases = [Case({"schedule": NoiseSchedule(), "eps_pred": eps, "x_t": x_t, "t": t, "noise": z}, f"t={t}")
             for t in (999, 500, 1, 0)]
    return check("ddpm_step", fn, _reference_ddpm_step, cases, atol=1e-4, rtol=1e-4)


# --- Lesson 04: samplers ------------------------------------------------------------------------


def _reference_ddim_step(schedule: NoiseSchedule, eps_pred: torch.Tensor, x_t: torch.Tensor, t: int,
                         t_prev: int) -> torch.Tensor:
    return samplers.ddim_step(schedule, eps_pred, x_t, t, t_prev)  # η = 0: the deterministic step


def check_ddim_step(fn: Callable) -> Callable:
    """Check ``fn(schedule, eps_pred, x_t, t, t_prev)``: one deterministic DDIM step (eq. 12, η = 0)."""
    x_t, eps = _randn(2, 1, 8, 8, seed=9), _randn(2, 1, 8, 8, seed=10)
    cases = [
        Case({"schedule": schedule, "eps_pred": eps, "x_t": x_t, "t": t, "t_prev": t_prev}, label)
        for schedule, t, t_prev, label in [
            (NoiseSchedule(), 999, 979, "linear, first of 50 steps"),
            (NoiseSchedule(), 500, 300, "linear, a long jump"),
            (NoiseSchedule(), 19, 0, "linear, the last step"),
            (NoiseSchedule.stable_diffusion(), 701, 681, "SD schedule"),
            (NoiseSchedule(), 20, 40, "uphill, as inversion uses it"),
        ]
    ]
    return check("ddim_step", fn, _reference_ddim_step, cases, atol=1e-4, rtol=1e-4)


def check_euler_step(fn: Callable) -> Callable:
    """Check ``fn(x, eps_pred, sigma, sigma_next)``: one Euler step of dx̄/dσ = ε̂ (Karras et al. 2022)."""
    x, eps = _randn(2, 1, 8, 8, seed=11), _randn(2, 1, 8, 8, seed=12)
    cases = [
        Case({"x": x * (1 + sigma**2) ** 0.5, "eps_pred": eps, "sigma": sigma, "sigma_next": sigma_next}, label)
        for sigma, sigma_next, label in [(157.0, 131.0, "high noise"), (1.0, 0.8, "sigma near 1"),
                                         (0.08, 0.0, "the last step, to sigma = 0")]
    ]
    cases.append(Case({"x": x, "eps_pred": eps, "sigma": torch.tensor(3.0), "sigma_next": torch.tensor(2.5)},
                      "sigmas as 0-dim tensors"))
    return check("euler_step", fn, samplers.euler_step, cases, atol=1e-4, rtol=1e-5)


# --- Lesson 05: the VAE -------------------------------------------------------------------------


def _reference_reparameterize(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return mean + torch.exp(0.5 * logvar) * noise


def check_reparameterize(fn: Callable) -> Callable:
    """Check ``fn(mean, logvar, noise)``: z = μ + σ ε with σ = exp(½ log σ²) (Kingma & Welling 2014, eq. 10)."""
    mean, noise = _randn(2, 4, 3, 3, seed=13), _randn(2, 4, 3, 3, seed=14)
    cases = [Case({"mean": mean, "logvar": logvar, "noise": noise}, label)
             for logvar, label in [(torch.zeros(2, 4, 3, 3), "log σ² = 0 (σ = 1)"),
                                   (torch.full((2, 4, 3, 3), -4.0), "log σ² = -4 (σ = e⁻²)"),
                                   (_randn(2, 4, 3, 3, seed=15), "random log σ²")]]
    return check("reparameterize", fn, _reference_reparameterize, cases)


def _reference_kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def check_kl_divergence(fn: Callable) -> Callable:
    """Check ``fn(mean, logvar)``: KL(N(μ, σ²) ‖ N(0, 1)) summed over each image's latents, shape (B,)."""
    cases = [Case({"mean": torch.zeros(2, 4, 2, 2), "logvar": torch.zeros(2, 4, 2, 2)}, "the prior itself: KL = 0"),
             Case({"mean": _randn(3, 4, 2, 2, seed=16), "logvar": torch.zeros(3, 4, 2, 2)}, "σ = 1, random μ"),
             Case({"mean": _randn(3, 4, 2, 2, seed=17), "logvar": _randn(3, 4, 2, 2, seed=18) - 3}, "small σ")]
    return check("kl_divergence", fn, _reference_kl_divergence, cases, atol=1e-4, rtol=1e-5)


def _reference_scaling_factor(latents: torch.Tensor) -> torch.Tensor:
    return torch.tensor(1.0 / latents.float().std().item())


def check_scaling_factor(fn: Callable) -> Callable:
    """Check ``fn(latents)``: 1 / (standard deviation of all latent values), SD's recipe for 0.18215."""
    cases = [Case({"latents": _randn(64, 4, 8, 8, seed=19) * scale + shift}, f"std {scale}, mean {shift}")
             for scale, shift in [(5.5, 0.0), (0.5, 0.2), (1.0, -1.0)]]
    return check("scaling_factor", fn, _reference_scaling_factor, cases, atol=1e-5, rtol=1e-4)


# --- Lesson 06: the compression factor ----------------------------------------------------------


def _reference_psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    from .metrics import psnr

    return psnr(a, b, data_range)


def check_psnr(fn: Callable) -> Callable:
    """Check ``fn(a, b, data_range)``: PSNR per image, 10 log10(L² / MSE), shape (B,)."""
    a = _randn(3, 3, 8, 8, seed=20).clamp(-1, 1)
    cases = [Case({"a": a, "b": (a + 0.1 * _randn(3, 3, 8, 8, seed=21)).clamp(-1, 1), "data_range": 2.0}, "[-1, 1] images"),
             Case({"a": (a + 1) / 2, "b": (a + 1) / 2 + 0.01, "data_range": 1.0}, "[0, 1] images, constant error")]
    return check("psnr", fn, _reference_psnr, cases, atol=1e-3, rtol=1e-5)


def _reference_frechet_distance(mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor,
                                sigma_b: torch.Tensor) -> torch.Tensor:
    from .metrics import frechet_distance_gaussians

    return torch.tensor(frechet_distance_gaussians(mu_a.numpy(), sigma_a.numpy(), mu_b.numpy(), sigma_b.numpy()))


def check_frechet_distance(fn: Callable) -> Callable:
    """Check ``fn(mu_a, sigma_a, mu_b, sigma_b)``: ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)."""
    def covariance(seed: int, d: int = 4) -> torch.Tensor:
        m = _randn(d, d, seed=seed).double()
        return m @ m.T / d + 0.1 * torch.eye(d, dtype=torch.float64)

    mu = _randn(4, seed=22).double()
    cases = [Case({"mu_a": mu, "sigma_a": covariance(23), "mu_b": mu, "sigma_b": covariance(23)}, "identical: 0"),
             Case({"mu_a": mu, "sigma_a": torch.eye(4, dtype=torch.float64), "mu_b": mu + 1,
                   "sigma_b": torch.eye(4, dtype=torch.float64)}, "shifted means, unit covariances"),
             Case({"mu_a": mu, "sigma_a": covariance(24), "mu_b": -mu, "sigma_b": covariance(25)}, "random")]
    return check("frechet_distance", fn, _reference_frechet_distance, cases, atol=1e-4, rtol=1e-4)
