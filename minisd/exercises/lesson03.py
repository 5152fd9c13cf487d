"""Checks for lesson 03: pixel-space DDPM."""

from __future__ import annotations

from typing import Callable

import torch

from .. import diffusion, samplers
from ..config import get_device
from ..nn import embeddings
from ..schedules import NoiseSchedule
from .core import Case, ExerciseError, _compare, _fresh, _inputs, check, randn

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


class _Recorder:
    """The toy ε_θ, remembering every (x_t, t) it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)  # as given, on its own device: the check compares it with x0's
        self.calls.append((x_t.detach(), t.detach()))
        return _toy_eps_model(x_t, t.to(x_t.device))

    def __repr__(self) -> str:
        return "a toy ε_θ(x_t, t)"


def _reference_ddpm_loss(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor,
                         generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                         noise: torch.Tensor | None = None) -> torch.Tensor:
    if t is None and noise is None:
        return diffusion.ddpm_loss(model, schedule, x0, generator)  # t first, then ε, both from generator
    if t is None:
        t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    return torch.nn.functional.mse_loss(model(schedule.add_noise(x0, noise, t), t), noise)


_DRAWS_HINT = ("Hint: draw on the CPU with `generator` (torch.randint(..., generator=generator), "
              "torch.randn(x0.shape, generator=generator)), then move the draws with `.to(x0.device)`.")


def _call(fn: Callable, kwargs: dict, label: str):
    """fn(**kwargs) on fresh generators; a learner's exception becomes an ExerciseError."""
    try:
        return fn(**_fresh(kwargs))
    except NotImplementedError:
        raise
    except Exception as error:
        hint = f"\n  {_DRAWS_HINT}" if "device" in str(error) or "generator" in str(error) else ""
        raise ExerciseError(f"`ddpm_loss` raised {type(error).__name__}: {error}\n  on input {label}{hint}") from error


def _check_own_draws(fn: Callable, schedule: NoiseSchedule, device: torch.device) -> bool:
    """Call fn with a generator only; check that its draws are reproducible, t uniform integers and ε
    standard normal, and that it returns the MSE for its own draws. True if the draws are the reference's."""
    x0 = randn(64, 1, 8, 8, seed=9).clamp(-1, 1).to(device)
    kwargs = {"schedule": schedule, "x0": x0, "generator": torch.Generator().manual_seed(3)}
    label = "own draws: (model, schedule, x0 of shape (64, 1, 8, 8), generator) with t and noise left to None"
    first, second = _Recorder(), _Recorder()
    got = _call(fn, {"model": first, **kwargs}, label)
    again = _call(fn, {"model": second, **kwargs}, label)
    where = f"`ddpm_loss` on input {label}"
    if len(first.calls) != 1:
        raise ExerciseError(f"{where} called the model {len(first.calls)} times; call it once, on x_t and t.")
    if got is None:
        raise ExerciseError(f"{where} returned None: did you forget the `return`?")
    got, again = torch.as_tensor(got).detach(), torch.as_tensor(again).detach()
    if got.numel() != 1:
        raise ExerciseError(f"{where} returned shape {tuple(got.shape)}; return one number, the mean over batch and pixels.")
    if not torch.equal(got, again) or not torch.equal(first.calls[0][1], second.calls[0][1]):
        raise ExerciseError(f"{where} gave different results for two generators in the same state: draw t and ε "
                            f"from `generator`, so that training is reproducible.\n  {_DRAWS_HINT}")
    x_t, t = first.calls[0]
    T = schedule.num_train_timesteps
    if t.shape != (x0.shape[0],) or t.is_floating_point() or t.min() < 0 or t.max() >= T:
        raise ExerciseError(f"{where} gave the model t = {t.flatten()[:8].tolist()}… (shape {tuple(t.shape)}, "
                            f"{t.dtype}); draw one integer timestep per image in [0, {T - 1}] with torch.randint(0, {T}, (B,), …).")
    if t.min() > T // 4 or t.max() < 3 * T // 4:  # 64 uniform draws: both fail with probability < 1e-7
        raise ExerciseError(f"{where} drew 64 timesteps in [{int(t.min())}, {int(t.max())}] only; "
                            f"draw them uniformly from all of [0, {T - 1}].")
    if x_t.device != x0.device or t.device != x0.device:
        raise ExerciseError(f"{where} gave the model x_t on {x_t.device} and t on {t.device}, x0 is on {x0.device}.\n  {_DRAWS_HINT}")
    alpha_bar_t = schedule.gather(schedule.alphas_cumprod, t, x0).double()
    noise = (x_t.double() - alpha_bar_t.sqrt() * x0.double()) / (1 - alpha_bar_t).sqrt()  # the ε your x_t holds
    if noise.mean().abs() > 0.1 or not 0.9 < noise.std() < 1.1:
        raise ExerciseError(f"{where}: the noise in your x_t has mean {noise.mean():.3f} and standard deviation "
                            f"{noise.std():.3f}; ε ~ N(0, I) has 0 and 1 (with torch.randn, and x_t from schedule.add_noise).")
    expected = torch.nn.functional.mse_loss(_toy_eps_model(x_t, t.to(x_t.device)).double(), noise)
    if not torch.allclose(got.double().cpu(), expected.cpu(), rtol=1e-4, atol=1e-5):
        raise ExerciseError(f"{where} returned {got.item():.6g}, but the mean squared error between the model's "
                            f"prediction and the noise you added is {expected.item():.6g}.")
    reference = _reference_ddpm_loss(_toy_eps_model, **_fresh(kwargs))
    return bool(torch.allclose(got.double().cpu(), reference.detach().double().cpu(), rtol=1e-5, atol=1e-6))


def check_ddpm_loss(fn: Callable) -> Callable:
    """Check ``fn(model, schedule, x0, generator, t=None, noise=None)``: L_simple (DDPM eq. 14).

    First with the draws given (t and noise passed in: any correct formula matches the reference);
    then with a generator only (the learner draws t and ε: any order of the two draws passes, the
    message says when it differs from the reference's). Inputs live on ``config.get_device()``.
    """
    device, schedule = get_device(), NoiseSchedule()
    x0 = randn(8, 1, 8, 8, seed=5).clamp(-1, 1).to(device)
    cases = [
        Case({"model": _Recorder(), "schedule": schedule, "x0": x0, "generator": None,
              "t": torch.tensor(t, device=device), "noise": randn(8, 1, 8, 8, seed=seed).to(device)},
             f"given draws {i + 1} (t and noise passed in)")
        for i, (t, seed) in enumerate([([0, 1, 10, 250, 500, 750, 998, 999], 6), ([999, 3, 640, 7, 77, 0, 512, 333], 7)])
    ]
    for case in cases:
        recorder = _Recorder()
        try:
            got = fn(**{**case.kwargs, "model": recorder})
        except NotImplementedError:
            print("📝 `ddpm_loss` is not written yet: using minisd's reference so the lesson can go on.")
            return _reference_ddpm_loss
        except Exception as error:
            raise ExerciseError(f"`ddpm_loss` raised {type(error).__name__}: {error}\n  on input {_inputs(case)}") from error
        try:
            _compare("ddpm_loss", case, _reference_ddpm_loss(**case.kwargs), got, atol=1e-5, rtol=1e-5)
        except ExerciseError as error:
            used = recorder.calls[0][1].cpu() if recorder.calls else None
            if used is not None and not torch.equal(used.flatten(), case.kwargs["t"].cpu()):
                raise ExerciseError(f"{error}\n  Hint: the model was called with t = {used.tolist()}: use the `t` and "
                                    "`noise` passed in, and draw your own only when they are None.") from None
            raise
    same_draws = _check_own_draws(fn, schedule, device)
    note = "" if same_draws else (
        "\n   Your draws differ from the reference's (it draws t first, then ε): that is fine, any order is "
        "correct; only your training numbers will differ a little from the stored ones.")
    print(f"✅ `ddpm_loss` matches the reference on {len(cases)} inputs with the draws given, and draws its own "
          f"t and ε correctly.{note}")
    return fn


def _reference_ddpm_step(schedule: NoiseSchedule, eps_pred: torch.Tensor, x_t: torch.Tensor, t: int,
                         noise: torch.Tensor) -> torch.Tensor:
    return samplers.ddpm_step(schedule, eps_pred, x_t, t, t - 1, noise=noise)


def check_ddpm_step(fn: Callable) -> Callable:
    """Check ``fn(schedule, eps_pred, x_t, t, noise)``: one ancestral step t -> t-1 (DDPM eq. 11)."""
    x_t, eps, z = randn(2, 1, 8, 8, seed=6), randn(2, 1, 8, 8, seed=7), randn(2, 1, 8, 8, seed=8)
    cases = [Case({"schedule": NoiseSchedule(), "eps_pred": eps, "x_t": x_t, "t": t, "noise": z}, f"t={t}")
             for t in (999, 500, 1, 0)]
    return check("ddpm_step", fn, _reference_ddpm_step, cases, atol=1e-4, rtol=1e-4)
