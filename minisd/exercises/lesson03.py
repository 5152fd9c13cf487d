"""Checks for lesson 03: pixel-space DDPM."""

from __future__ import annotations

from typing import Callable

import torch

from .. import diffusion, samplers
from ..nn import embeddings
from ..schedules import NoiseSchedule
from .core import Case, check, randn

__all__ = ["check_timestep_embedding", "check_ddpm_loss", "check_ddpm_step"]


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
    x0 = randn(8, 1, 8, 8, seed=5).clamp(-1, 1)
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
    x_t, eps, z = randn(2, 1, 8, 8, seed=6), randn(2, 1, 8, 8, seed=7), randn(2, 1, 8, 8, seed=8)
    cases = [Case({"schedule": NoiseSchedule(), "eps_pred": eps, "x_t": x_t, "t": t, "noise": z}, f"t={t}")
             for t in (999, 500, 1, 0)]
    return check("ddpm_step", fn, _reference_ddpm_step, cases, atol=1e-4, rtol=1e-4)
