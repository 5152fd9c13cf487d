"""Checks for lesson 11: image-to-image (SDEdit, Meng et al. 2021).

The answers drive a sampler, so the checks hand the learner's function instrumented stand-ins: a
tiny VAE whose posterior is a point (σ = e^-15, so that its mean, its mode and a sample agree), and a
fake ε-model that records every (x_t, t) it is called with. The recorded calls show where sampling
started and from what, so a wrong answer is named at the first sub-step that diverges: the start
index, the scaling factor, the timestep the latents were noised to, the ``start_step`` handed to
the sampler, the number of steps.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .. import samplers
from ..nn.vae import AutoencoderConfig, AutoencoderKL
from ..pipeline import img2img_start
from ..schedules import NoiseSchedule
from .core import ExerciseError, not_written, randn

__all__ = ["check_img2img_start", "check_image_to_image", "check_ddim_invert_to",
           "reference_image_to_image", "reference_ddim_invert_to"]

TOL = 1e-5
SD_SPACING = ("leading", 1)  # SD's timestep_spacing and steps_offset: what samplers.sample uses by default


def _close(a: Any, b: torch.Tensor, atol: float = TOL) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a.detach().double(), b.double(), atol=atol, rtol=TOL)


def _call(name: str, fn: Callable, label: str, *args) -> Any:
    """fn(*args); NotImplementedError passes through, anything else becomes an ExerciseError naming the input."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except Exception as error:
        hint = ("\n  Hint: when int(n · strength) = 0 there is no step to take: return the scaled latents without "
                "calling the sampler." if "start_step must be" in str(error) else "")
        raise ExerciseError(f"`{name}` raised {type(error).__name__}: {error}\n  on input {label}{hint}") from error


# ----------------------------------------------------------------------------- 1. where sampling starts


def _diagnose_start(where: str, n: int, strength: float, expected: int, got: Any) -> None:
    try:
        got = int(got)
    except (TypeError, ValueError) as error:
        raise ExerciseError(f"{where} returned a {type(got).__name__}, expected an int (an index).") from error
    if got == expected:
        return
    steps = min(int(n * strength), n)
    if got == steps and steps != expected:
        raise ExerciseError(f"{where} returned {got} = int(n · strength), the number of steps to TAKE; sampling "
                            f"starts that many steps before the end: n − {steps} = {expected}.")
    if got == n - min(round(n * strength), n):
        raise ExerciseError(f"{where} returned {got}: you rounded n · strength = {n * strength:g}; diffusers truncates "
                            f"with int(), so {steps} steps are taken, from index {expected}.")
    raise ExerciseError(f"{where} returned {got}, expected {expected} = n − min(int(n · strength), n).")


def check_img2img_start(fn: Callable) -> Callable:
    """Check ``fn(num_inference_steps, strength)`` -> the index of the first timestep img2img takes."""
    cases = [(50, 0.8), (25, 0.5), (25, 0.7), (10, 0.3), (50, 1.0), (50, 0.01), (20, 0.0)]
    for n, strength in cases:
        where = f"`img2img_start` on input (num_inference_steps={n}, strength={strength})"
        try:
            got = fn(n, strength)
        except NotImplementedError:
            return not_written("img2img_start", img2img_start)
        except Exception as error:
            raise ExerciseError(f"{where} raised {type(error).__name__}: {error}") from error
        if got is None:
            raise ExerciseError(f"{where} returned None: did you forget the `return`?")
        _diagnose_start(where, n, strength, img2img_start(n, strength), got)
    print(f"✅ `img2img_start` matches diffusers' get_timesteps on {len(cases)} inputs.")
    return fn


# ----------------------------------------------------------------------------- 2. image-to-image


class _RecordingModel:
    """A stand-in ε-model: ε̂ = 0.3 x_t + 0.05 cos(t / 100), recording each (x_t, t) it is called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return 0.3 * x + 0.05 * torch.cos(t.double() / 100).to(x.dtype)[:, None, None, None]


def _point_vae(seed: int = 110) -> AutoencoderKL:
    """A tiny f = 4 VAE with random weights and log σ² = −30: mean, mode and samples agree to 3e-7."""
    config = AutoencoderConfig(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=16,
                               scaling_factor=0.6)
    vae = AutoencoderKL(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        c = config.latent_channels
        vae.quant_conv.weight[c:] = 0.0  # the log-variance half of the moments
        vae.quant_conv.bias[c:] = -30.0
        vae.quant_conv.weight[:c] *= 4.0  # means of order 1, so that a missing scaling factor shows
    return vae.eval()


@torch.no_grad()
def reference_image_to_image(model: samplers.Model, vae: AutoencoderKL, schedule: NoiseSchedule, image: torch.Tensor,
                             strength: float, num_inference_steps: int, noise: torch.Tensor) -> torch.Tensor:
    """SDEdit as diffusers' img2img: encode, noise to timesteps[start], DDIM from there; returns latents (B, 4, h, w)."""
    start_step = img2img_start(num_inference_steps, strength)
    latents = vae.encode(image).mode() * vae.config.scaling_factor  # z_0, scaled as in training
    if start_step == num_inference_steps:  # int(n · strength) = 0: no step to take
        return latents
    timesteps = schedule.inference_timesteps(num_inference_steps, *SD_SPACING)
    x = schedule.add_noise(latents, noise, timesteps[start_step])  # x_{t_0} ~ q(x_{t_0} | z_0)
    return samplers.sample(model, x, schedule, "ddim", num_inference_steps, start_step=start_step, progress=False)


def _diagnose_first_x(where: str, x: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule,
                      timesteps: torch.Tensor, start: int, strength: float, scaling_factor: float) -> None:
    """Name what the sampler was started from, when it is not add_noise(latents, noise, timesteps[start])."""
    t0 = int(timesteps[start])
    if _close(x, schedule.add_noise(latents, noise, t0)):
        return
    if _close(x, schedule.add_noise(latents / scaling_factor, noise, t0)):
        raise ExerciseError(f"{where}: the latents are not scaled. Multiply the VAE's latents by "
                            f"vae.config.scaling_factor (here {scaling_factor}): the U-Net was trained on scaled latents.")
    if _close(x, noise):
        raise ExerciseError(f"{where}: the sampler started from the noise alone. Noise the image's latents to "
                            f"timesteps[{start}] = {t0} with schedule.add_noise(latents, noise, t); at strength = 1 "
                            f"too (there √ᾱ = {schedule.alphas_cumprod[t0].sqrt():.3f} of the image remains).")
    if _close(x, latents):
        raise ExerciseError(f"{where}: the sampler started from the clean latents: noise them first, "
                            f"schedule.add_noise(latents, noise, timesteps[{start}]).")
    alpha_bar = schedule.alphas_cumprod[t0]
    if _close(x, alpha_bar * latents + (1 - alpha_bar) * noise):
        raise ExerciseError(f"{where}: x = ᾱ z_0 + (1 − ᾱ) ε; the forward process uses square roots: "
                            "√ᾱ z_0 + √(1 − ᾱ) ε (schedule.add_noise).")
    tried = {int(timesteps[start - 1]) if start > 0 else None: "the timestep BEFORE the start",
             int(timesteps[start + 1]) if start + 1 < len(timesteps) else None: "the timestep AFTER the start",
             t0 - 1: "the sampler's timesteps without SD's steps_offset = 1",
             int(1000 * strength): "1000 · strength", int(1000 * (1 - strength)): "1000 · (1 − strength)",
             start: "the start INDEX used as a timestep", 999: "the last training timestep"}
    for t, what in tried.items():
        if t is not None and 0 <= t < schedule.num_train_timesteps and t != t0 \
                and _close(x, schedule.add_noise(latents, noise, t)):
            hint = (" Take the timesteps the sampler takes: schedule.inference_timesteps(n, 'leading', 1)."
                    if t == t0 - 1 else "")
            raise ExerciseError(f"{where}: the latents were noised to t = {t} ({what}), but the sampler's first step "
                                f"is at timesteps[{start}] = {t0}: noise them to t = {t0}.{hint}")
    raise ExerciseError(f"{where}: the first x_t the model sees is not add_noise(scaled latents, noise, "
                        f"timesteps[{start}] = {t0}): largest difference "
                        f"{(x - schedule.add_noise(latents, noise, t0)).abs().max().item():.3g}.")


def _diagnose_image_to_image(where: str, got: Any, calls: list, case: dict, vae: AutoencoderKL,
                             schedule: NoiseSchedule) -> None:
    n, strength, noise = case["num_inference_steps"], case["strength"], case["noise"]
    start, s = img2img_start(n, strength), vae.config.scaling_factor
    timesteps = schedule.inference_timesteps(n, *SD_SPACING)
    with torch.no_grad():
        latents = vae.encode(case["image"]).mode() * s
    if start == n:
        if calls:
            raise ExerciseError(f"{where}: strength = {strength} takes int(n · strength) = 0 steps, so there is "
                                f"nothing to sample: return the image's scaled latents as they are.")
        if _close(got, latents / s):
            raise ExerciseError(f"{where}: the latents are not scaled: multiply by vae.config.scaling_factor ({s}).")
    elif not calls:
        raise ExerciseError(f"{where}: the model was never called: hand x to samplers.sample(model, x, schedule, "
                            f"'ddim', num_inference_steps, start_step=…).")
    else:
        first_t, expected_t = int(calls[0][1][0]), int(timesteps[start])
        if first_t != expected_t:
            if first_t == int(timesteps[0]) and len(calls) == n:
                raise ExerciseError(f"{where}: the sampler ran all {n} steps from t = {first_t}: pass "
                                    f"start_step={start} to samplers.sample, so that it starts at timesteps[{start}] = "
                                    f"{expected_t}, the level your x is noised to.")
            if first_t in timesteps.tolist():
                k = timesteps.tolist().index(first_t)
                hint = (f" You started at index int(n · strength) = {k}: that is the number of steps to take; "
                        f"start at n − {k} = {start}." if k == n - start else "")
                raise ExerciseError(f"{where}: sampling started at index {k} (t = {first_t}), expected index {start} "
                                    f"(t = {expected_t}) = n − min(int(n · strength), n).{hint}")
            raise ExerciseError(f"{where}: the model's first timestep is {first_t}, not one of the {n} timesteps of "
                                f"samplers.sample with num_inference_steps={n}: keep num_inference_steps = {n} and "
                                f"pass start_step={start}.")
        _diagnose_first_x(where, calls[0][0], latents, noise, schedule, timesteps, start, strength, s)
        if len(calls) != n - start:
            raise ExerciseError(f"{where}: the model was called {len(calls)} times; from index {start} of {n} "
                                f"the sampler takes {n - start} steps.")
    if isinstance(got, torch.Tensor) and got.ndim == 4 and got.shape[1] == 3:
        raise ExerciseError(f"{where} returned images {tuple(got.shape)}: return the latents (B, 4, h, w); "
                            "the lesson decodes them.")
    expected = reference_image_to_image(_RecordingModel(), vae, schedule, **case)
    _final_compare(where, "the returned latents", expected, got,
                   "Use samplers.sample with sampler='ddim' (η = 0) and return its result as it is.")


def _final_compare(where: str, what: str, expected: torch.Tensor, got: Any, hint: str) -> None:
    if not isinstance(got, torch.Tensor):
        raise ExerciseError(f"{where}: {what} are a {type(got).__name__}, expected a tensor {tuple(expected.shape)}.")
    if got.shape != expected.shape:
        raise ExerciseError(f"{where}: {what} have shape {tuple(got.shape)}, expected {tuple(expected.shape)}.")
    if _close(got, expected):
        return
    error = (got.detach().double() - expected.double()).abs()
    raise ExerciseError(f"{where}: every sub-step checked so far is right, but {what} differ from the reference by up "
                        f"to {error.max().item():.3g}. {hint}")


def check_image_to_image(fn: Callable) -> Callable:
    """Check ``fn(model, vae, schedule, image, strength, num_inference_steps, noise)`` -> latents (B, 4, h, w)."""
    vae, schedule = _point_vae(), NoiseSchedule.stable_diffusion()
    image = torch.nn.functional.interpolate(randn(2, 3, 4, 4, seed=111).tanh(), size=16, mode="bilinear")
    cases = [(0.6, 10), (0.75, 8), (1.0, 6), (0.05, 10)]
    for i, (strength, n) in enumerate(cases):
        case = {"image": image, "strength": strength, "num_inference_steps": n, "noise": randn(2, 4, 4, 4, seed=112 + i)}
        label = f"strength={strength}, num_inference_steps={n}, image (2, 3, 16, 16), noise (2, 4, 4, 4)"
        model = _RecordingModel()
        try:
            got = _call("image_to_image", fn, label, model, vae, schedule, *case.values())
        except NotImplementedError:
            return not_written("image_to_image", reference_image_to_image)
        where = f"`image_to_image` on input ({label})"
        if got is None:
            raise ExerciseError(f"{where} returned None: did you forget the `return`?")
        _diagnose_image_to_image(where, got, model.calls, case, vae, schedule)
    print(f"✅ `image_to_image` matches the reference on {len(cases)} inputs, sub-step by sub-step.")
    return fn


# ----------------------------------------------------------------------------- 3. DDIM inversion


@torch.no_grad()
def reference_ddim_invert_to(model: samplers.Model, latents: torch.Tensor, schedule: NoiseSchedule,
                             num_inference_steps: int, start_step: int) -> torch.Tensor:
    """DDIM inversion from z_0 up to timesteps[start_step] (``samplers.ddim_invert``, stopped early)."""
    timesteps = schedule.inference_timesteps(num_inference_steps, *SD_SPACING)
    levels = [-1] + timesteps.flip(0).tolist()[: num_inference_steps - start_step]  # z_0, then upwards
    x = latents
    for s, t in zip(levels[:-1], levels[1:]):
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long))  # ε̂ at the level we move TO
        x = samplers.ddim_step(schedule, eps, x, s, t)
    return x


def _diagnose_inversion(where: str, got: Any, calls: list, case: dict, schedule: NoiseSchedule) -> None:
    n, start = case["num_inference_steps"], case["start_step"]
    timesteps = schedule.inference_timesteps(n, *SD_SPACING)
    targets = timesteps.flip(0).tolist()[: n - start]  # the levels the model should be evaluated at
    reference = _RecordingModel()
    expected = reference_ddim_invert_to(reference, **case)
    ts = [int(t[0]) for _, t in calls]
    if not calls:
        raise ExerciseError(f"{where}: the model was never called: each inversion step needs ε̂ = model(x, t).")
    if ts[0] == int(timesteps[0]) and n - start > 1:
        raise ExerciseError(f"{where}: the first model call is at t = {ts[0]}, the noisiest timestep: inversion goes UP, "
                            f"from z_0 to the least noisy timestep first (timesteps.flip(0)).")
    if ts[0] == -1 or (len(ts) > 1 and ts[1] == targets[0]):
        raise ExerciseError(f"{where}: the model was called at the level you step FROM (t = {ts[0]}, then "
                            f"{ts[1] if len(ts) > 1 else '…'}); DDIM inversion evaluates it at the level you step TO, "
                            f"ε̂(x_s, t) ≈ ε̂(x_t, t), as diffusers' DDIMInverseScheduler: first t = {targets[0]}.")
    if ts[0] != targets[0]:
        raise ExerciseError(f"{where}: the first model call is at t = {ts[0]}; the first step goes from z_0 "
                            f"(level −1 for ddim_step: SD's final ᾱ_0) to t = {targets[0]}, with ε̂ = model(z_0, {targets[0]}).")
    if len(ts) != len(targets):
        last = targets[-1]
        raise ExerciseError(f"{where}: {len(ts)} inversion steps (model calls at t = {ts}); stopping at "
                            f"timesteps[{start}] = {last} takes {len(targets)}: {targets}.")
    for k, ((x, _), (x_ref, _)) in enumerate(zip(calls, reference.calls)):
        if not _close(x, x_ref):
            what = "the first call's x is not z_0, the latents given" if k == 0 else \
                f"x after {k} inversion step{'s' if k > 1 else ''} (passed to the model with t = {ts[k]}) is wrong"
            raise ExerciseError(f"{where}: {what} (largest difference {(x - x_ref).abs().max().item():.3g}). "
                                "Step with samplers.ddim_step(schedule, eps, x, s, t): from level s (first −1) to t.")
    _final_compare(where, "the returned latents", expected, got, "Return x after the last inversion step.")


def check_ddim_invert_to(fn: Callable) -> Callable:
    """Check ``fn(model, latents, schedule, num_inference_steps, start_step)`` -> x at timesteps[start_step]."""
    schedule = NoiseSchedule.stable_diffusion()
    cases = [(10, 4), (6, 0), (8, 7)]
    for i, (n, start) in enumerate(cases):
        case = {"latents": randn(2, 4, 4, 4, seed=113 + i), "schedule": schedule, "num_inference_steps": n,
                "start_step": start}
        label = f"num_inference_steps={n}, start_step={start}, latents (2, 4, 4, 4)"
        model = _RecordingModel()
        try:
            got = _call("ddim_invert_to", fn, label, model, *case.values())
        except NotImplementedError:
            return not_written("ddim_invert_to", reference_ddim_invert_to)
        where = f"`ddim_invert_to` on input ({label})"
        if got is None:
            raise ExerciseError(f"{where} returned None: did you forget the `return`?")
        _diagnose_inversion(where, got, model.calls, case, schedule)
    print(f"✅ `ddim_invert_to` matches the reference on {len(cases)} inputs, step by step.")
    return fn
