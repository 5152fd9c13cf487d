"""Checks for lesson 01: forward diffusion."""

from __future__ import annotations

from typing import Callable

import torch

from .. import diffusion
from ..schedules import NoiseSchedule
from .core import Case, check, randn

__all__ = ["check_q_step", "check_add_noise"]


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
