"""Checks for lesson 04: samplers."""

from __future__ import annotations

from typing import Callable

import torch

from .. import samplers
from ..schedules import NoiseSchedule
from .core import Case, check, randn

__all__ = ["check_ddim_step", "check_euler_step"]


def _reference_ddim_step(schedule: NoiseSchedule, eps_pred: torch.Tensor, x_t: torch.Tensor, t: int,
                         t_prev: int) -> torch.Tensor:
    return samplers.ddim_step(schedule, eps_pred, x_t, t, t_prev)  # η = 0: the deterministic step


def check_ddim_step(fn: Callable) -> Callable:
    """Check ``fn(schedule, eps_pred, x_t, t, t_prev)``: one deterministic DDIM step (eq. 12, η = 0)."""
    x_t, eps = randn(2, 1, 8, 8, seed=9), randn(2, 1, 8, 8, seed=10)
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
    x, eps = randn(2, 1, 8, 8, seed=11), randn(2, 1, 8, 8, seed=12)
    cases = [
        Case({"x": x * (1 + sigma**2) ** 0.5, "eps_pred": eps, "sigma": sigma, "sigma_next": sigma_next}, label)
        for sigma, sigma_next, label in [(157.0, 131.0, "high noise"), (1.0, 0.8, "sigma near 1"),
                                         (0.08, 0.0, "the last step, to sigma = 0")]
    ]
    cases.append(Case({"x": x, "eps_pred": eps, "sigma": torch.tensor(3.0), "sigma_next": torch.tensor(2.5)},
                      "sigmas as 0-dim tensors"))
    return check("euler_step", fn, samplers.euler_step, cases, atol=1e-4, rtol=1e-5)
