"""Checks for lesson 01: forward diffusion: one step of the chain, its closed form, and the whole chain.

``check_forward_chain`` compares the learner's chain with the reference's on the same draws (one
``torch.randn`` like x per step, in order) and names the first slip (off by one, the same noise every
step, one β for all steps, the closed form instead of the chain, ᾱ_t as √ᾱ_t …). Draws taken in another
order pass if the result follows q(x_t | x_0) (eq. 4) within sampling error, reproducibly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .. import diffusion
from ..schedules import NoiseSchedule
from .core import Case, ExerciseError, call_learner, check, not_written, randn

__all__ = ["check_q_step", "check_add_noise", "check_forward_chain", "reference_forward_chain"]


def check_q_step(fn: Callable) -> Callable:
    """Check ``fn(x_prev, noise, beta_t)``: one step of the forward chain (DDPM eq. 2)."""
    cases = [
        Case({"x_prev": randn(2, 3, 8, 8, seed=1), "noise": randn(2, 3, 8, 8, seed=2), "beta_t": beta}, label)
        for beta, label in [(1e-4, "tiny beta"), (0.02, "DDPM's last beta"), (0.5, "half noise")]
    ]
    cases.append(Case({"x_prev": torch.ones(1, 1, 2, 2), "noise": torch.zeros(1, 1, 2, 2), "beta_t": 0.36}, "no noise"))
    return check("q_step", fn, diffusion.q_step, cases)


def _reference_add_noise(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return schedule.add_noise(x0, noise, t)


def check_add_noise(fn: Callable) -> Callable:
    """Check ``fn(schedule, x0, noise, t)``: the closed form q(x_t | x_0) (DDPM eq. 4), one t per image."""
    x0, noise = randn(4, 3, 8, 8, seed=3), randn(4, 3, 8, 8, seed=4)
    cases = [
        Case({"schedule": NoiseSchedule(), "x0": x0, "noise": noise, "t": torch.tensor([0, 10, 500, 999])}, "linear"),
        Case({"schedule": NoiseSchedule.stable_diffusion(), "x0": x0, "noise": noise, "t": torch.tensor([999, 0, 250, 1])}, "SD"),
        Case({"schedule": NoiseSchedule(beta_schedule="cosine"), "x0": x0[:1], "noise": noise[:1], "t": torch.tensor([700])}, "cosine"),
    ]
    return check("add_noise", fn, _reference_add_noise, cases)


# ----------------------------------------------------------------------------- the chain, step by step


def reference_forward_chain(schedule: NoiseSchedule, x0: torch.Tensor, t: int,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t after steps 0 … t of eq. 2 (fresh noise at each, from ``generator``), and ᾱ_t = ∏_{s ≤ t} (1 - β_s)."""
    return diffusion.forward_chain(schedule, x0, t, generator), schedule.alphas_cumprod[t]


def _draws(x0: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    """The reference's draws: one standard normal like x0 per step, in order."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x0.shape, generator=g, dtype=x0.dtype) for _ in range(n)]


def _chain(schedule: NoiseSchedule, x: torch.Tensor, noises: list[torch.Tensor], steps: Any) -> torch.Tensor:
    """q_step (eq. 2) at each step s of ``steps``, with the matching noise."""
    for noise, s in zip(noises, steps):
        x = diffusion.q_step(x, noise, schedule.betas[s])
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=1e-5, atol=0)  # float32 products: ~1e-6 relative


def _diagnose_chain(where: str, schedule: NoiseSchedule, x0: torch.Tensor, t: int, seed: int, got: Any) -> bool:
    """Raise naming the first slip; True if x_t is the reference's (same draws), False if it is not (the caller then
    checks the distribution)."""
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise ExerciseError(f"{where} returned a {type(got).__name__}; return a pair (x_t, alpha_bar_t).")
    x_t, alpha_bar = got[0], torch.as_tensor(got[1], dtype=torch.float64)
    products = schedule.alphas.double().cumprod(0)
    for wrong, hint in [(products[t - 1] if t else torch.tensor(1.0), "it is ᾱ_{t-1}: steps 0, 1, …, t are t + 1 "
                         "steps, range(t + 1)"), (products[t].sqrt(), "that is √ᾱ_t, the signal weight: multiply "
                         "the (1 − β_s) themselves"), (schedule.betas[:t + 1].double().prod(), "multiply the (1 − β_s), "
                         "not the β_s"), (1 - products[t], "that is 1 − ᾱ_t, the noise variance: multiply the (1 − β_s)"),
                        ((1 - schedule.betas[t].double()) ** (t + 1), "step s uses its own β_s: schedule.betas[s], not betas[t]")]:
        if alpha_bar.numel() == 1 and _same(alpha_bar, wrong) and not _same(wrong, products[t]):
            raise ExerciseError(f"{where}: alpha_bar_t = {alpha_bar.item():.6g} is wrong: {hint}.")
    if alpha_bar.numel() != 1 or not _same(alpha_bar, products[t]):
        raise ExerciseError(f"{where}: alpha_bar_t should be the product of (1 − β_s) for s = 0 … {t}, "
                            f"{products[t].item():.6g}; got {alpha_bar.flatten()[:3].tolist()}.")
    noises = _draws(x0, t + 2, seed)
    expected = _chain(schedule, x0, noises[:t + 1], range(t + 1))
    if not isinstance(x_t, torch.Tensor) or x_t.shape != x0.shape:
        raise ExerciseError(f"{where}: x_t is a {type(x_t).__name__} of shape {tuple(getattr(x_t, 'shape', ()))}, "
                            f"expected a tensor shaped like x0, {tuple(x0.shape)}.")
    if torch.allclose(x_t, expected, atol=1e-5, rtol=1e-5):
        return True
    slips = [(x0, "x_t is x0: apply q_step at each step s = 0 … t, x = q_step(x, noise, beta_s)"),
             (_chain(schedule, x0, noises[:t], range(t)), "one step short: steps 0, 1, …, t are t + 1 steps, range(t + 1)"),
             (_chain(schedule, x0, noises[:1] * (t + 1), range(t + 1)), "the same noise at every step: draw fresh noise "
              "inside the loop"),
             (_chain(schedule, x0, noises[:t + 1], [t] * (t + 1)), "step s uses its own β_s: schedule.betas[s], "
              "not betas[t]"),
             (schedule.add_noise(x0, noises[0], t), "that is the closed form, one draw: the chain applies q_step "
              "t + 1 times with fresh noise each time")]
    if t + 1 < schedule.num_train_timesteps:
        slips.append((_chain(schedule, x0, noises, range(t + 2)), "one step too many: the steps are s = 0, 1, …, t"))
    for wrong, hint in slips:
        if torch.allclose(x_t, wrong, atol=1e-5, rtol=1e-5) and not torch.allclose(wrong, expected, atol=1e-5, rtol=1e-5):
            raise ExerciseError(f"{where}: x_t is wrong: {hint}.")
    return False


def _check_distribution(fn: Callable) -> None:
    """When the draws differ from the reference's: x_t must still follow q(x_t | x_0) (eq. 4), reproducibly."""
    schedule, x0, t = NoiseSchedule(10, beta_start=0.05, beta_end=0.3), torch.full((20_000, 1, 1, 1), 0.8), 4
    where = "`forward_chain` on 20,000 copies of a pixel 0.8, t = 4 of a 10-step schedule (betas 0.05 to 0.3)"
    runs = [call_learner("forward_chain", fn, {"schedule": schedule, "x0": x0, "t": t,
                                               "generator": torch.Generator().manual_seed(7)}, where)[0] for _ in range(2)]
    if not torch.equal(runs[0], runs[1]):
        raise ExerciseError(f"{where}: two runs with generators in the same state differ: draw every noise with "
                            "torch.randn(x.shape, generator=generator).")
    mean, std = diffusion.q_mean_std(schedule, x0[:1], t)
    n, got_mean, got_var = x0.shape[0], runs[0].mean(), runs[0].var()
    gap_mean, gap_var = (got_mean - mean.flatten()[0]) / (std / n**0.5), (got_var - std**2) / (std**2 * (2 / n) ** 0.5)
    if gap_mean.abs() > 6 or gap_var.abs() > 6:
        raise ExerciseError(f"{where}: x_t has mean {got_mean:.4f} and variance {got_var:.4f}; q(x_t | x_0) (eq. 4) has "
                            f"{mean.flatten()[0]:.4f} and {(std**2).item():.4f}: check the steps (s = 0 … t, β_s at step s) "
                            "and draw fresh standard normal noise at each.")


def check_forward_chain(fn: Callable) -> Callable:
    """Check ``fn(schedule, x0, t, generator)`` -> (x_t after steps 0 … t of eq. 2, ᾱ_t = ∏_{s ≤ t} (1 - β_s))."""
    cases = [(NoiseSchedule(), randn(2, 3, 8, 8, seed=10), 9, 11, "DDPM's schedule, 2 images 3×8×8, t = 9 (10 steps)"),
             (NoiseSchedule(beta_schedule="cosine"), randn(1, 1, 4, 4, seed=12), 0, 13, "cosine schedule, t = 0 (1 step)"),
             (NoiseSchedule(10, beta_start=0.05, beta_end=0.3), randn(3, 1, 4, 4, seed=14), 9, 15,
              "a 10-step schedule (betas 0.05 to 0.3), t = 9: the whole chain")]
    same_draws = True
    for schedule, x0, t, seed, label in cases:
        kwargs = {"schedule": schedule, "x0": x0.clone(), "t": t, "generator": torch.Generator().manual_seed(seed)}
        where = f"`forward_chain` on input {label}"
        try:
            got = call_learner("forward_chain", fn, kwargs, f"input {label}")
        except NotImplementedError:
            return not_written("forward_chain", reference_forward_chain)
        if got is None:
            raise ExerciseError(f"{where} returned None: did you forget the `return`?")
        same_draws &= _diagnose_chain(where, schedule, x0, t, seed, got)
    if not same_draws:
        _check_distribution(fn)
    note = "" if same_draws else ("\n   Your draws differ from the reference's (one torch.randn like x per step, in "
                                  "order): that is fine, x_t follows q(x_t | x_0); only your numbers will differ.")
    print(f"✅ `forward_chain` matches the reference on {len(cases)} inputs.{note}")
    return fn
