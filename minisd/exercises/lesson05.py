"""Checks for lesson 05: the VAE."""

from __future__ import annotations

from typing import Callable

import torch

from .core import Case, check, randn

__all__ = ["check_reparameterize", "check_kl_divergence", "check_scaling_factor"]


def _reference_reparameterize(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return mean + torch.exp(0.5 * logvar) * noise


def check_reparameterize(fn: Callable) -> Callable:
    """Check ``fn(mean, logvar, noise)``: z = μ + σ ε with σ = exp(½ log σ²) (Kingma & Welling 2014, eq. 10)."""
    mean, noise = randn(2, 4, 3, 3, seed=13), randn(2, 4, 3, 3, seed=14)
    cases = [Case({"mean": mean, "logvar": logvar, "noise": noise}, label)
             for logvar, label in [(torch.zeros(2, 4, 3, 3), "log σ² = 0 (σ = 1)"),
                                   (torch.full((2, 4, 3, 3), -4.0), "log σ² = -4 (σ = e⁻²)"),
                                   (randn(2, 4, 3, 3, seed=15), "random log σ²")]]
    return check("reparameterize", fn, _reference_reparameterize, cases)


def _reference_kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def check_kl_divergence(fn: Callable) -> Callable:
    """Check ``fn(mean, logvar)``: KL(N(μ, σ²) ‖ N(0, 1)) summed over each image's latents, shape (B,)."""
    cases = [Case({"mean": torch.zeros(2, 4, 2, 2), "logvar": torch.zeros(2, 4, 2, 2)}, "the prior itself: KL = 0"),
             Case({"mean": randn(3, 4, 2, 2, seed=16), "logvar": torch.zeros(3, 4, 2, 2)}, "σ = 1, random μ"),
             Case({"mean": randn(3, 4, 2, 2, seed=17), "logvar": randn(3, 4, 2, 2, seed=18) - 3}, "small σ")]
    return check("kl_divergence", fn, _reference_kl_divergence, cases, atol=1e-4, rtol=1e-5)


def _reference_scaling_factor(latents: torch.Tensor) -> torch.Tensor:
    return torch.tensor(1.0 / latents.float().std().item())


def check_scaling_factor(fn: Callable) -> Callable:
    """Check ``fn(latents)``: 1 / (standard deviation of all latent values), SD's recipe for 0.18215."""
    cases = [Case({"latents": randn(64, 4, 8, 8, seed=19) * scale + shift}, f"std {scale}, mean {shift}")
             for scale, shift in [(5.5, 0.0), (0.5, 0.2), (1.0, -1.0)]]
    return check("scaling_factor", fn, _reference_scaling_factor, cases, atol=1e-5, rtol=1e-4)
