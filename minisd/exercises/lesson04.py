"""Checks for lesson 04: samplers.

``check_ddim_step`` and ``check_euler_step`` compare one step with minisd's and, for a wrong answer, say
which common slip it equals. ``check_dpmpp_2m`` checks a whole sampler loop: it hands the learner's
``dpmpp_2m`` a stand-in ε-model that records every call, so the state after each step is seen (it is
the input of the next call), and compares step by step: the first step that differs is named, with the
sub-step that explains it ("h must be λ_next - λ, not σ_next - σ", "you used the previous ε …").
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .. import samplers
from ..schedules import NoiseSchedule
from .core import Case, ExerciseError, Slips, check_parts, compare, not_written, randn

__all__ = ["check_ddim_step", "check_euler_step", "check_dpmpp_2m", "reference_dpmpp_2m"]

TOL = 1e-4  # float32 answers vs the float64 reference; the slips below differ by ≥ 1e-2


def _close(a: Any, b: torch.Tensor, tol: float = TOL) -> bool:
    return (isinstance(a, torch.Tensor) and a.shape == b.shape
            and bool(torch.allclose(a.detach().double(), b.double(), atol=tol, rtol=tol)))


def _compare_with_hints(name: str, slips: Callable[[dict], Slips], atol: float, rtol: float) -> Callable:
    """A ``check_parts`` diagnosis: compare's message, plus the hint of the first slip the answer equals."""
    def diagnose(where: str, case: Case, expected: torch.Tensor, got: Any) -> None:
        try:
            compare(name, case, expected, got, atol, rtol)
        except ExerciseError as error:
            hint = next((hint for wrong, hint in slips(case.kwargs)
                         if _close(got, wrong) and not _close(wrong, expected)), None)
            raise ExerciseError(f"{error}\n  Hint: {hint}." if hint else str(error)) from None
    return diagnose


# ----------------------------------------------------------------------------- 1. one DDIM step


def _reference_ddim_step(schedule: NoiseSchedule, eps_pred: torch.Tensor, x_t: torch.Tensor, t: int,
                         t_prev: int) -> torch.Tensor:
    return samplers.ddim_step(schedule, eps_pred, x_t, t, t_prev)  # η = 0: the deterministic step


def _ddim_slips(k: dict) -> Slips:
    """What common slips in eq. 12 (η = 0) give on the inputs ``k``."""
    schedule, eps, x_t, t, t_prev = k["schedule"], k["eps_pred"], k["x_t"], k["t"], k["t_prev"]
    ab, ab_prev, a = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t_prev], schedule.alphas[t]
    x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
    return [
        ((ab_prev * (x_t - (1 - ab) * eps) / ab) + (1 - ab_prev) * eps,
         "ᾱ enters through square roots: √ᾱ_t, √(1 - ᾱ_t), √ᾱ_prev and √(1 - ᾱ_prev)"),
        (x0, "you returned x0_pred: put it back at the next noise level, √ᾱ_prev · x0_pred + √(1 - ᾱ_prev) · ε̂"),
        (ab_prev.sqrt() * (x_t + (1 - ab).sqrt() * eps) / ab.sqrt() + (1 - ab_prev).sqrt() * eps,
         "x0_pred removes the noise: (x_t - √(1 - ᾱ_t) ε̂) / √ᾱ_t, with a minus sign"),
        (ab_prev.sqrt() * (x_t - (1 - a).sqrt() * eps) / a.sqrt() + (1 - ab_prev).sqrt() * eps,
         "x0_pred needs ᾱ_t = schedule.alphas_cumprod[t], not α_t = schedule.alphas[t]"),
        (ab_prev.sqrt() * x0, "the second term is missing: the step re-uses the predicted noise, + √(1 - ᾱ_prev) · ε̂"),
    ]


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
    return check_parts("ddim_step", fn, _reference_ddim_step, cases, _compare_with_hints("ddim_step", _ddim_slips, 1e-4, 1e-4))


# ----------------------------------------------------------------------------- 2. one Euler step


def _euler_slips(k: dict) -> Slips:
    """What common slips in Euler's step x̄ + (σ_next - σ) ε̂ give on the inputs ``k``."""
    x, eps, sigma, sigma_next = k["x"], k["eps_pred"], k["sigma"], k["sigma_next"]
    return [
        (x + (sigma - sigma_next) * eps, "σ falls, so the step is (σ_next - σ) · ε̂, a negative multiple of ε̂"),
        (x - sigma * eps, "you returned D = x̄ - σ ε̂, the x0 prediction: Euler only goes as far as σ_next"),
        (x + (sigma_next - sigma) * eps / sigma, "the slope dx̄/dσ = (x̄ - D) / σ is ε̂ itself: do not divide by σ again"),
        (x + sigma_next * eps, "the step is the *change* of σ times ε̂: (σ_next - σ) · ε̂"),
    ]


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
    return check_parts("euler_step", fn, samplers.euler_step, cases, _compare_with_hints("euler_step", _euler_slips, 1e-4, 1e-5))


# ----------------------------------------------------------------------------- 3. DPM-Solver++(2M), the whole loop


def reference_dpmpp_2m(model: samplers.Model, x_T: torch.Tensor, sigmas: torch.Tensor,
                       timesteps: torch.Tensor) -> torch.Tensor:
    """minisd's DPM-Solver++(2M) loop (``samplers.dpm_x0_pred``, ``samplers.dpmpp_2m_step``) on the given grid.

    x_T: unit noise on the DDPM scale (B, …); sigmas: σ of each timestep and a final 0, (n + 1,);
    timesteps: (n,). The same loop as ``samplers.sample(…, "dpmpp_2m")`` on that grid.
    """
    x, x0_pred_prev = x_T, None
    for i, t in enumerate(timesteps):
        x0_pred = samplers.dpm_x0_pred(x, model(x, t), sigmas[i])
        sigma_prev = sigmas[i - 1] if x0_pred_prev is not None else None
        x = samplers.dpmpp_2m_step(x, x0_pred, x0_pred_prev, sigma_prev, sigmas[i], sigmas[i + 1])
        x0_pred_prev = x0_pred
    return x


class _RecordingModel:
    """A stand-in ε-model, smooth but not linear, that records every call: (x as given, t as an int, ε̂).

    ε̂ = √(1 - ᾱ) x / (ᾱ s² + 1 - ᾱ) + 0.2 sin(3x + t/150): the ideal ε of N(0, s²) data (s = 0.5), bent.
    """

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule, self.calls = schedule, []

    def __call__(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        t_all = torch.as_tensor(t).reshape(-1)
        t_int = int(t_all[0]) if t_all.numel() and bool((t_all == t_all[0]).all()) else None
        alpha_bar = float(self.schedule.alphas_cumprod[min(max(t_int or 0, 0), self.schedule.num_train_timesteps - 1)])
        eps = (1 - alpha_bar) ** 0.5 * x / (0.25 * alpha_bar + 1 - alpha_bar) + 0.2 * torch.sin(3 * x + (t_int or 0) / 150)
        self.calls.append((x.detach().clone(), t_int, eps.detach().clone()))
        return eps


def _scales(sigma: float) -> tuple[float, float]:
    """DPM-Solver's (α_t, σ_t) = (√ᾱ, √(1 - ᾱ)) from σ-space's σ."""
    return 1 / (sigma**2 + 1) ** 0.5, sigma / (sigma**2 + 1) ** 0.5


def _step_slips(x: torch.Tensor, eps: torch.Tensor, sigma: float, sigma_next: float, memory: dict | None,
                first: dict | None) -> tuple[torch.Tensor, Slips]:
    """(right x_next, slips) for one step from x (float64); ``memory``/``first``: x0_pred, ε̂, λ and σ of the
    previous step and of step 0 (None on the first step; ``first`` None before the third)."""
    a, s = _scales(sigma)
    x0 = (x - s * eps) / a  # DDPM eq. 15
    x0_slips = [(x - sigma * eps, "the x0 prediction is off: σ-space's x̄ - σ ε̂ does not apply on the DDPM scale; "
                                  "x0_pred = (x - √(1 - ᾱ) ε̂) / √ᾱ with √ᾱ = 1/√(σ² + 1), √(1 - ᾱ) = σ/√(σ² + 1)"),
                ((x - s**2 * eps) / a**2, "the x0 prediction is off: ᾱ enters through square roots, √ᾱ = 1/√(σ² + 1) "
                                          "and √(1 - ᾱ) = σ/√(σ² + 1)")]
    if sigma_next == 0:  # the last step: only the data prediction is left
        return x0, x0_slips + [(x, "the last step returned x unchanged: at σ_next = 0 return x0_pred")]
    a_n, s_n = _scales(sigma_next)
    lam, lam_n = -math.log(sigma), -math.log(sigma_next)  # λ = log(α_t / σ_t) = -log σ
    h = lam_n - lam

    def step(D: torch.Tensor, h: float = h, ratio: float = s_n / s, coef: float = a_n,
             sign: float = -1.0) -> torch.Tensor:  # DPM-Solver++ Algorithm 2, the update
        return ratio * x + sign * coef * (math.exp(-h) - 1) * D

    r = (lam - memory["lam"]) / h if memory else 1.0  # r = h_prev / h

    def D(x0_now: torch.Tensor = x0, prev: torch.Tensor | None = memory["x0"] if memory else None, r: float = r,
          half: float = 0.5) -> torch.Tensor:  # first step (no prev): D = x0_pred, DDIM's step
        return x0_now if prev is None else x0_now + half / r * (x0_now - prev)

    right = step(D())
    h_sigma = sigma_next - sigma
    r_sigma = (sigma - memory["sigma"]) / h_sigma if memory else 1.0
    slips = [(step(D(x0_now=wrong)), hint) for wrong, hint in x0_slips] + [
        (step(D(r=r_sigma), h=h_sigma), "h must be λ_next - λ (λ = log(√ᾱ/√(1 - ᾱ)) = -log σ), not σ_next - σ"),
        (step(D(), h=-h), "the exponent has the wrong sign: h = λ_next - λ > 0 (λ = -log σ grows as the noise "
                          "falls), and the factor is e^(-h) - 1"),
        (step(D(), ratio=a_n / a), "x_t is scaled by DPM-Solver's σ_next/σ_t = √(1 - ᾱ_next)/√(1 - ᾱ), the noise "
                                   "scales, not by √ᾱ_next/√ᾱ (that ratio belongs to the ε-form of DPM-Solver)"),
        (step(D(), ratio=sigma_next / sigma), "x_t is scaled by DPM-Solver's σ_t ratio √(1 - ᾱ_next)/√(1 - ᾱ), with "
                                              "√(1 - ᾱ) = σ/√(σ² + 1), not by σ-space's σ_next/σ"),
        (step(D(), coef=1.0), "the D term is scaled by √ᾱ_next = 1/√(σ_next² + 1)"),
        (step(D(), coef=s_n), "the D term is scaled by √ᾱ_next = 1/√(σ_next² + 1), the signal scale, not the "
                              "noise scale"),
        (step(D(), sign=1.0), "x_next = (σ_next/σ_t) x_t - √ᾱ_next (e^(-h) - 1) D: mind the minus sign"),
    ]
    if memory is None:
        return right, slips
    x0_rule = "D = (1 + 1/(2r)) x0_pred - 1/(2r) x0_pred_prev"
    slips += [
        (step(x0), f"your step matches DDIM's, first order: from the second step on, correct it with the previous "
                   f"x0_pred, {x0_rule}"),
        (step(D(r=1 / r)), "r = h_prev / h = (λ - λ_prev)/(λ_next - λ); you used its inverse"),
        (step(D(half=1.0)), "the correction is (x0_pred - x0_pred_prev)/(2r): the factor 1/2 is missing"),
        (step(D(r=1.0)), "r is missing (D as if r = 1): the λ steps are uneven, r = (λ - λ_prev)/(λ_next - λ)"),
        (step(D(prev=memory["eps"])), f"you used the previous ε instead of the previous x0 prediction: DPM-Solver++ "
                                      f"extrapolates the data prediction, {x0_rule}"),
        (step(x0 + 0.5 / r * (eps - memory["eps"])), f"the correction uses the ε predictions: DPM-Solver++ "
                                                      f"extrapolates the x0 predictions, {x0_rule}"),
        (step(D(x0_now=memory["x0"], prev=x0)), "x0_pred and x0_pred_prev are swapped in D"),
    ]
    if first is not None:  # from the third step on: memory that was never updated
        r_first = (lam - first["lam"]) / h
        slips += [(step(D(prev=first["x0"], r=r_first)), "x0_pred_prev and λ_prev must be the previous step's: "
                                                          "update them at the end of every step"),
                  (step(D(prev=first["x0"])), "x0_pred_prev must be the previous step's x0_pred: update it at the end "
                                              "of every step"),
                  (step(D(r=r_first)), "λ_prev must be the previous step's λ: update it at the end of every step")]
    return right, slips


def _same_overflow(got: torch.Tensor, wrong: torch.Tensor) -> bool:
    """``got`` and ``wrong`` are ±inf at the same places (at least one), and close elsewhere."""
    finite = torch.isfinite(wrong)
    return (not bool(finite.all()) and not bool(got.isnan().any()) and torch.equal(got.isposinf(), wrong.isposinf())
            and torch.equal(got.isneginf(), wrong.isneginf()) and _close(got[finite], wrong[finite]))


def _first_slip(where: str, what: str, got: Any, expected: torch.Tensor, slips: Slips) -> None:
    """Raise naming the first slip that ``got`` equals (and the right answer does not); else the largest difference."""
    if not isinstance(got, torch.Tensor):
        raise ExerciseError(f"{where}: {what} is a {type(got).__name__}, expected a tensor.")
    if got.shape != expected.shape:
        raise ExerciseError(f"{where}: {what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)} like x_T.")
    if _close(got, expected):
        return
    if not torch.isfinite(got).all():
        for wrong, hint in slips:  # a slip that overflows float32 where the answer did
            if _same_overflow(got, wrong.float()):
                raise ExerciseError(f"{where}: {what} overflows to inf: {hint}.")
        raise ExerciseError(f"{where}: {what} holds NaN or inf values.")
    for wrong, hint in slips:
        if _close(got, wrong) and not _close(wrong, expected):
            raise ExerciseError(f"{where}: {what} is wrong: {hint}.")
    error = (got.detach().double() - expected).abs()
    i = tuple(int(j) for j in torch.unravel_index(error.argmax(), error.shape))
    raise ExerciseError(f"{where}: {what} has wrong values: largest difference {error.max().item():.3g} at index {i} "
                        f"(expected {expected[i].item():.6g}, got {got[i].item():.6g}).")


def _diagnose_dpmpp_2m(name: str, label: str, case: dict, calls: list, got: Any, error: Exception | None) -> None:
    """Walk the recorded model calls step by step; raise at the first step whose result differs."""
    x_T, sigmas, timesteps = case["x_T"], case["sigmas"].double().tolist(), case["timesteps"].tolist()
    n = len(timesteps)
    for j, (_, t_in, _) in enumerate(calls):  # one evaluation per step, at timesteps[j]: checked first
        if j < n and t_in == timesteps[j]:
            continue
        if j > 0 and t_in == calls[j - 1][1]:
            raise ExerciseError(f"`{name}` on {label}, step {j - 1}: the model was evaluated twice at t = {t_in}: "
                                "DPM-Solver++(2M) needs one evaluation per step; its second order comes from the "
                                "previous x0_pred.")
        if j >= n:
            raise ExerciseError(f"`{name}` on {label}: the model was called {len(calls)} times for {n} steps: "
                                "DPM-Solver++(2M) evaluates it once per step.")
        raise ExerciseError(f"`{name}` on {label}, step {j}: the model got t = {t_in}; step {j} evaluates it at "
                            f"timesteps[{j}] = {timesteps[j]}.")
    memory = first = None  # what the previous step and step 0 predicted, for the second-order steps
    x = x_T.double()
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        where = f"`{name}` on {label}, step {i} (σ = {sigma:.3g} → {sigma_next:.3g})"
        if i >= len(calls):
            if error is not None:
                return
            if n == len(calls) + 1 and _close(got, x):
                raise ExerciseError(f"{where}: the last step is missing: loop over all {n} timesteps; the last one goes "
                                    "to σ = 0 and returns x0_pred.")
            raise ExerciseError(f"{where}: the model was called {len(calls)} times for {n} steps: evaluate it once at "
                                "every timestep, model(x, timesteps[i]).")
        x_in, _, eps = calls[i]
        scale_hint = ("DPM-Solver++ works on the DDPM scale: start from x_T as it is (no init_noise_sigma) and give the "
                      "model x unscaled")
        _first_slip(where, "the model's input", x_in, x, [(x * sigma, scale_hint), (x * (sigma**2 + 1) ** 0.5, scale_hint)])
        eps = eps.double()
        right, slips = _step_slips(x, eps, sigma, sigma_next, memory, first)
        if error is not None and i + 1 >= len(calls):
            return  # the learner's code failed inside this step; the caller reports the exception
        nxt = calls[i + 1][0] if i + 1 < len(calls) else got
        if i == n - 1 and isinstance(nxt, torch.Tensor) and nxt.shape == right.shape and not torch.isfinite(nxt).all():
            raise ExerciseError(f"{where}: the result holds NaN or inf: the last step (σ_next = 0) must return x0_pred, "
                                "since λ_next = -log 0 = ∞ leaves h, r and e^(-h) undefined; special-case it.")
        _first_slip(where, "the result" if i + 1 >= len(calls) else "the state it hands to the next model call",
                    nxt, right, slips)
        a, s = _scales(sigma)
        first = memory if first is None and memory is not None else first
        memory = {"x0": (x - s * eps) / a, "eps": eps, "lam": -math.log(sigma), "sigma": sigma}
        x = right


def check_dpmpp_2m(fn: Callable) -> Callable:
    """Check ``fn(model, x_T, sigmas, timesteps)``: DPM-Solver++(2M) from x_T to x_0 (Lu et al. 2022, Algorithm 2).

    ``model`` is a stand-in that records each call; the state after step i is the input of call i + 1,
    so each step is compared with the reference from the learner's own previous state.
    """
    def case(schedule: NoiseSchedule, n: int, spacing: str, offset: int, shape: tuple, seed: int) -> dict:
        timesteps = schedule.inference_timesteps(n, spacing, offset)
        return {"schedule": schedule, "x_T": randn(*shape, seed=seed), "timesteps": timesteps,
                "sigmas": samplers.inference_sigmas(schedule, timesteps)}

    cases = [("6 'trailing' steps of DDPM's linear schedule, x_T of shape (2, 1, 4, 4)",
              case(NoiseSchedule(), 6, "trailing", 0, (2, 1, 4, 4), 40)),
             ("4 'leading' steps (offset 1) of SD's schedule, 5 points in the plane",
              case(NoiseSchedule.stable_diffusion(), 4, "leading", 1, (5, 2), 41)),
             ("2 'trailing' steps of DDPM's linear schedule, x_T of shape (3, 2)",
              case(NoiseSchedule(), 2, "trailing", 0, (3, 2), 42))]
    for label, c in cases:
        model = _RecordingModel(c["schedule"])
        args = (model, c["x_T"].clone(), c["sigmas"].clone(), c["timesteps"].clone())
        try:
            with torch.no_grad():
                got = fn(*args)
        except NotImplementedError:
            return not_written("dpmpp_2m", reference_dpmpp_2m)
        except Exception as error:
            _diagnose_dpmpp_2m("dpmpp_2m", label, c, model.calls, None, error)
            raise ExerciseError(f"`dpmpp_2m` raised {type(error).__name__}: {error}\n  on {label}, after "
                                f"{len(model.calls)} of {len(c['timesteps'])} model calls") from error
        if got is None:
            raise ExerciseError(f"`dpmpp_2m` on {label} returned None: did you forget the `return`?")
        _diagnose_dpmpp_2m("dpmpp_2m", label, c, model.calls, got, None)
    print(f"✅ `dpmpp_2m` matches minisd's DPM-Solver++(2M), step by step, on {len(cases)} runs.")
    return fn
