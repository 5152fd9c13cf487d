"""Checks for lesson 06: the compression factor."""

from __future__ import annotations

from typing import Callable

import torch

from .core import Case, check, randn

__all__ = ["check_psnr", "check_frechet_distance"]


def _reference_psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    from ..metrics import psnr

    return psnr(a, b, data_range)


def check_psnr(fn: Callable) -> Callable:
    """Check ``fn(a, b, data_range)``: PSNR per image, 10 log10(L² / MSE), shape (B,)."""
    a = randn(3, 3, 8, 8, seed=20).clamp(-1, 1)
    cases = [Case({"a": a, "b": (a + 0.1 * randn(3, 3, 8, 8, seed=21)).clamp(-1, 1), "data_range": 2.0}, "[-1, 1] images"),
             Case({"a": (a + 1) / 2, "b": (a + 1) / 2 + 0.01, "data_range": 1.0}, "[0, 1] images, constant error")]
    return check("psnr", fn, _reference_psnr, cases, atol=1e-3, rtol=1e-5)


def _reference_frechet_distance(mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor,
                                sigma_b: torch.Tensor) -> torch.Tensor:
    from ..metrics import frechet_distance_gaussians

    return torch.tensor(frechet_distance_gaussians(mu_a.numpy(), sigma_a.numpy(), mu_b.numpy(), sigma_b.numpy()))


def check_frechet_distance(fn: Callable) -> Callable:
    """Check ``fn(mu_a, sigma_a, mu_b, sigma_b)``: ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)."""
    def covariance(seed: int, d: int = 4) -> torch.Tensor:
        m = randn(d, d, seed=seed).double()
        return m @ m.T / d + 0.1 * torch.eye(d, dtype=torch.float64)

    mu = randn(4, seed=22).double()
    cases = [Case({"mu_a": mu, "sigma_a": covariance(23), "mu_b": mu, "sigma_b": covariance(23)}, "identical: 0"),
             Case({"mu_a": mu, "sigma_a": torch.eye(4, dtype=torch.float64), "mu_b": mu + 1,
                   "sigma_b": torch.eye(4, dtype=torch.float64)}, "shifted means, unit covariances"),
             Case({"mu_a": mu, "sigma_a": covariance(24), "mu_b": -mu, "sigma_b": covariance(25)}, "random")]
    return check("frechet_distance", fn, _reference_frechet_distance, cases, atol=1e-4, rtol=1e-4)
