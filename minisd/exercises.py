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

from . import diffusion, schedules
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
        expected = reference(**case.kwargs)
        try:
            got = fn(**case.kwargs)
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
