"""Checks for lesson 06: the compression factor."""

from __future__ import annotations

from typing import Callable

import torch

from .core import Case, ExerciseError, check, describe_inputs, randn

__all__ = ["check_psnr", "check_frechet_distance", "check_mmd2_unbiased"]


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


def _mmd2_variants(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The unbiased MMD² and the values the usual slips give instead, each with its hint."""
    D, m, n = x.shape[1], len(x), len(y)
    kernels = {"right": lambda a, b: (a @ b.T / D + 1) ** 3,
               "the kernel must divide the dot product by D: (x·y / D + 1)³": lambda a, b: (a @ b.T + 1) ** 3,
               "the kernel needs the + 1 inside the cube: (x·y / D + 1)³": lambda a, b: (a @ b.T / D) ** 3,
               "the kernel is cubic: (x·y / D + 1)³, not squared": lambda a, b: (a @ b.T / D + 1) ** 2,
               "the kernel is (x·y / D + 1)³, a polynomial, not the plain dot product": lambda a, b: a @ b.T / D}
    out = {}
    for hint, k in kernels.items():
        kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
        off = (kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1))
        out[hint] = (off - 2 * kxy.mean()).item()
        if hint != "right":
            continue
        out["the diagonal terms k(x_i, x_i) must be left out of the within-set sums: keeping them (a V-statistic) "
            "biases the estimate upwards"] = (kxx.mean() + kyy.mean() - 2 * kxy.mean()).item()
        out["after dropping the diagonal, each within-set sum has m(m − 1) terms, not m²"] = (
            (kxx.sum() - kxx.trace()) / m**2 + (kyy.sum() - kyy.trace()) / n**2 - 2 * kxy.mean()).item()
        out["the cross term counts twice: − 2 · mean of k(x_i, y_j)"] = (off - kxy.mean()).item()
        out["the cross term is a mean over all m · n pairs, diagonal included"] = (
            off - 2 * (kxy.sum() - kxy.diagonal().sum()) / (m * n - min(m, n))).item()
    return out


def check_mmd2_unbiased(fn: Callable) -> Callable:
    """Check ``fn(x, y)`` -> the unbiased MMD² of KID's kernel between rows of x (m, D) and y (n, D)."""
    cases = [Case({"x": randn(6, 3, seed=60).double(), "y": randn(6, 3, seed=61).double() + 0.5}, "m = n = 6, D = 3"),
             Case({"x": randn(9, 5, seed=62).double(), "y": randn(4, 5, seed=63).double()}, "m = 9, n = 4, D = 5"),
             Case({"x": randn(12, 2, seed=64).double() * 2, "y": randn(7, 2, seed=65).double()}, "m = 12, n = 7, D = 2")]
    for case in cases:
        variants = _mmd2_variants(**case.kwargs)
        try:
            got = fn(**case.kwargs)
        except NotImplementedError:
            print("📝 `mmd2_unbiased` is not written yet: using minisd's reference so the lesson can go on.")
            from ..metrics import mmd2_unbiased

            return lambda x, y: torch.tensor(mmd2_unbiased(x, y))
        except Exception as error:
            raise ExerciseError(f"`mmd2_unbiased` raised {type(error).__name__}: {error}\n  on input "
                                f"{describe_inputs(case)}") from error
        where = f"`mmd2_unbiased` on input {describe_inputs(case)}"
        got = torch.as_tensor(got, dtype=torch.float64)
        if got.numel() != 1:
            raise ExerciseError(f"{where} returned shape {tuple(got.shape)}: return one number (a 0-d tensor or a float).")
        got, expected = got.item(), variants.pop("right")
        if abs(got - expected) <= 1e-6 * max(1.0, abs(expected)):
            continue
        slip = next((hint for hint, value in variants.items() if abs(got - value) <= 1e-6 * max(1.0, abs(value))), None)
        raise ExerciseError(f"{where} gives {got:.6g}, expected {expected:.6g}.\n  "
                            + (f"Hint: {slip}." if slip else "Hint: write the three sums separately and compare "
                               "each with the formula above."))
    print(f"✅ `mmd2_unbiased` matches the unbiased estimate on {len(cases)} inputs.")
    return fn
