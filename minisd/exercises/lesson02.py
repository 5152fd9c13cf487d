"""Checks for lesson 02: noise schedules."""

from __future__ import annotations

from typing import Callable

import torch

from .. import schedules
from ..schedules import NoiseSchedule
from .core import Case, ExerciseError, check

__all__ = ["check_scaled_linear_betas", "check_cosine_betas", "check_leading_timesteps"]


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
    """Check ``fn(num_inference_steps, num_train_timesteps, steps_offset)``: SD's "leading" spacing.

    The answer must be a tensor of ints: the lesson indexes ``sigmas`` with it and calls ``.tolist()``.
    """
    cases = [
        Case({"num_inference_steps": n, "num_train_timesteps": 1000, "steps_offset": off}, f"{n} steps")
        for n, off in [(15, 1), (30, 1), (50, 0), (7, 1)]
    ]
    try:
        answer = fn(**cases[0].kwargs)
    except Exception:  # noqa: BLE001 - a stub or a bug: `check` below says which, on which input
        answer = None
    if answer is not None and not (isinstance(answer, torch.Tensor) and not answer.is_floating_point()
                                   and not answer.is_complex()):
        kind = f"a tensor of dtype {answer.dtype}" if isinstance(answer, torch.Tensor) else f"a {type(answer).__name__}"
        raise ExerciseError(
            f"`leading_timesteps` on input {cases[0].label} returned {kind}; return a tensor of ints "
            "(e.g. `torch.arange(...)`, or `torch.tensor(your_list)`): the cells below index `sigmas` with "
            "it and call `.tolist()` on it."
        )
    return check("leading_timesteps", fn, _reference_leading_timesteps, cases, atol=0, rtol=0)
