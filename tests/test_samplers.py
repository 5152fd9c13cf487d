"""Samplers: full trajectories against diffusers' schedulers (the oracle), closed-form cases, errors.

Tolerance: on torch 2.14.1 (CPU) every trajectory, the stochastic ones included, is bit-identical to
diffusers 0.42.1's, because each step evaluates the same float32 expressions in the same order. The
tests still allow 1e-5 absolute + 1e-5 relative (states reach |x| ≈ 25 with this toy model), room for
float32 rounding compounded over the steps should another kernel or diffusers version reorder an operation.
"""

import pytest
import torch

from minisd.samplers import (
    SAMPLERS,
    count_model_evaluations,
    ddim_invert,
    ddim_step,
    ddpm_step,
    sample,
)
from minisd.schedules import SD_BETA_END, SD_BETA_START, NoiseSchedule

SCHEDULE = NoiseSchedule.stable_diffusion()
SD_CONFIG = dict(
    num_train_timesteps=1000, beta_start=SD_BETA_START, beta_end=SD_BETA_END, beta_schedule="scaled_linear"
)
SHAPE = (2, 3, 8, 8)
TOL = dict(atol=1e-5, rtol=1e-5)  # float32 rounding (see the module docstring)


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear ε̂(x, t) that mixes neighbouring pixels. t: (B,) long from us, 0-dim from diffusers."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
    return 0.5 * torch.tanh(x + 0.3 * x.roll(1, dims=-1)) + 0.2 * (t / 1000) * x


def noise(seed: int = 0, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def diffusers_scheduler(sampler: str, spacing: str, **extra):
    """The diffusers scheduler for ``sampler`` with SD's config (clip_sample=False, set_alpha_to_one=False),
    plus ``extra`` config (``prediction_type``, ``use_karras_sigmas``; tests/test_prediction.py, test_karras.py).

    diffusers is a test extra: a parity test that calls this skips without it; the others still run."""
    diffusers = pytest.importorskip("diffusers")
    DDPMScheduler, DDIMScheduler = diffusers.DDPMScheduler, diffusers.DDIMScheduler
    DPMSolverMultistepScheduler = diffusers.DPMSolverMultistepScheduler
    EulerDiscreteScheduler, HeunDiscreteScheduler = diffusers.EulerDiscreteScheduler, diffusers.HeunDiscreteScheduler
    EulerAncestralDiscreteScheduler = diffusers.EulerAncestralDiscreteScheduler
    config = dict(SD_CONFIG, timestep_spacing=spacing, steps_offset=1, **extra)
    if sampler == "ddpm":
        return DDPMScheduler(**config, clip_sample=False)
    if sampler == "ddim":
        return DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=False)
    if sampler == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2)
    classes = dict(
        euler=EulerDiscreteScheduler, euler_ancestral=EulerAncestralDiscreteScheduler, heun=HeunDiscreteScheduler
    )
    return classes[sampler](**config)


def set_timesteps(scheduler, sampler: str, n: int, spacing: str) -> None:
    if sampler == "dpmpp_2m" and spacing == "leading" and not scheduler.config.get("use_karras_sigmas"):
        # DPMSolverMultistep's own "leading" grid uses T // (n + 1) (901, 811, …, 91 for n = 10); we keep
        # one grid for all samplers, so hand it ours.
        scheduler.set_timesteps(timesteps=SCHEDULE.inference_timesteps(n, spacing, 1).tolist())
    else:
        scheduler.set_timesteps(n)


def diffusers_trajectory(sampler, n, spacing, x_T, seed, eta=0.0, model=toy_model, scheduler=None, **extra):
    """diffusers' sampling loop; returns the state after every full step, on the DDPM scale, and the NFE.
    ``extra``: more scheduler config, as ``diffusers_scheduler``; ``model`` gets diffusers' t as it comes;
    ``scheduler``: one already set up (its timesteps set) instead."""
    if scheduler is None:
        scheduler = diffusers_scheduler(sampler, spacing, **extra)
        set_timesteps(scheduler, sampler, n, spacing)
    generator = torch.Generator().manual_seed(seed)
    x, states, nfe = x_T * scheduler.init_noise_sigma, [], 0
    for k, t in enumerate(scheduler.timesteps):
        eps = model(scheduler.scale_model_input(x, t), t)
        nfe += 1
        extra = dict(eta=eta) if sampler == "ddim" else {}
        if sampler in ("ddpm", "ddim", "euler_ancestral"):
            extra["generator"] = generator
        x = scheduler.step(eps, t, x, **extra).prev_sample
        if sampler == "heun" and not scheduler.state_in_first_order and k < len(scheduler.timesteps) - 1:
            continue  # Heun's predictor half-step: not a state of the trajectory
        if sampler in ("euler", "euler_ancestral", "heun"):
            states.append(x / (scheduler.sigmas[scheduler.step_index] ** 2 + 1) ** 0.5)
        else:
            states.append(x)
    return states, nfe


def our_trajectory(sampler, n, spacing, x_T, seed, eta=0.0, model=toy_model, **extra):
    """``sample``'s states after every step (its callback), and its result; ``extra``: more ``sample`` arguments."""
    states = []
    out = sample(
        model, x_T, SCHEDULE, sampler, n, generator=torch.Generator().manual_seed(seed), eta=eta,
        timestep_spacing=spacing, steps_offset=1, callback=lambda i, t, x: states.append(x), progress=False, **extra,
    )
    return states, out


CASES = [(s, 0.0) for s in SAMPLERS] + [("ddim", 0.5), ("ddim", 1.0)]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("sampler,eta", CASES, ids=[f"{s}-eta{e}" if s == "ddim" else s for s, e in CASES])
def test_full_trajectory_matches_diffusers(sampler, eta, n, spacing):
    x_T = noise(n)
    theirs, their_nfe = diffusers_trajectory(sampler, n, spacing, x_T, seed=7, eta=eta)
    ours, out = our_trajectory(sampler, n, spacing, x_T, seed=7, eta=eta)
    assert len(ours) == len(theirs) == n
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"step {i}: {m}")
    assert torch.equal(out, ours[-1])
    assert their_nfe == count_model_evaluations(sampler, n)


def test_stochastic_samplers_depend_on_the_seed_and_only_on_it():
    x_T = noise()
    for sampler in ("ddpm", "euler_ancestral"):
        a, b, c = (our_trajectory(sampler, 10, "leading", x_T, seed)[1] for seed in (1, 1, 2))
        assert torch.equal(a, b) and not torch.allclose(a, c)


def test_ddim_inversion_matches_diffusers_inverse_scheduler():
    x0 = noise(3).clamp(-1, 1)
    ours = []
    ddim_invert(toy_model, x0, SCHEDULE, 10, callback=lambda i, t, x: ours.append(x), progress=False)
    inverse = pytest.importorskip("diffusers").DDIMInverseScheduler(**SD_CONFIG, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    inverse.set_timesteps(10)
    assert len(ours) == len(inverse.timesteps) == 10
    x = x0
    for a, t in zip(ours, inverse.timesteps):
        x = inverse.step(toy_model(x, t), t, x).prev_sample
        torch.testing.assert_close(a, x, **TOL)


# --- closed-form cases ------------------------------------------------------------------------


@pytest.mark.parametrize("t,t_prev", [(999, 899), (501, 401), (300, 299), (21, 1)])
def test_ddim_with_eta_one_is_the_ddpm_step(t, t_prev):
    x_t, eps, z = noise(1), noise(2), noise(3)
    zero = torch.zeros(SHAPE)
    # The noise term σ_t z has σ_t² = β̃_t = (1 - ᾱ_prev) / (1 - ᾱ_t) · (1 - ᾱ_t / ᾱ_prev) ...
    step = ddim_step(SCHEDULE, eps, x_t, t, t_prev, eta=1.0, noise=z)
    noise_term = step - ddim_step(SCHEDULE, eps, x_t, t, t_prev, eta=1.0, noise=zero)
    alpha_bar_t, alpha_bar_prev = SCHEDULE.alphas_cumprod[t], SCHEDULE.alphas_cumprod[t_prev]
    beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    torch.testing.assert_close(noise_term, beta_tilde.sqrt() * z, atol=1e-6, rtol=1e-5)
    # ... and the whole step, mean included, is DDPM's.
    torch.testing.assert_close(step, ddpm_step(SCHEDULE, eps, x_t, t, t_prev, noise=z), atol=1e-5, rtol=0)


def test_ddim_with_eta_zero_keeps_the_noise_direction():
    """With ε̂ fixed, an η = 0 step keeps x on the line √ᾱ x0_pred + √(1 - ᾱ) ε̂ (eq. 12 with σ_t = 0)."""
    x0, eps = noise(1).clamp(-1, 1), noise(2)
    x_t = SCHEDULE.add_noise(x0, eps, 600)
    expected = SCHEDULE.add_noise(x0, eps, 200)
    torch.testing.assert_close(ddim_step(SCHEDULE, eps, x_t, 600, 200), expected, atol=1e-5, rtol=0)


def perfect_denoiser(x0_star: torch.Tensor):
    """ε̂(x_t, t) = (x_t - √ᾱ_t x0*) / √(1 - ᾱ_t): the exact ε when the data is the single point x0*."""
    def model(x_t, t):
        alpha_bar_t = SCHEDULE.gather(SCHEDULE.alphas_cumprod, t, x_t)
        return (x_t - alpha_bar_t.sqrt() * x0_star) / (1 - alpha_bar_t).sqrt()

    return model


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [1, 2, 7, 50])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_perfect_denoiser_lands_on_the_data_point(sampler, n, spacing):
    x0_star, x_T = noise(5).clamp(-1, 1), noise(6)
    generator = torch.Generator().manual_seed(0)
    out = sample(perfect_denoiser(x0_star), x_T, SCHEDULE, sampler, n, generator, timestep_spacing=spacing, progress=False)
    if sampler == "ddim":
        # SD's DDIM stops at ᾱ_0, not ᾱ = 1 (set_alpha_to_one=False): x0* plus the first step's ε̂, scaled.
        t0 = int(SCHEDULE.inference_timesteps(n, spacing, 1)[0])
        eps = perfect_denoiser(x0_star)(x_T, torch.full((SHAPE[0],), t0))
        expected = SCHEDULE.add_noise(x0_star, eps, 0)
    else:
        expected = x0_star  # the last step of the others reaches σ = 0 / ᾱ = 1, where x = x0_pred = x0*
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("n,start_step", [(1, 0), (10, 0), (25, 0), (25, 10)])
def test_model_evaluations_are_counted(sampler, n, start_step):
    calls = []

    def counting_model(x, t):
        calls.append(t)
        return toy_model(x, t)

    sample(counting_model, noise(), SCHEDULE, sampler, n, start_step=start_step, progress=False)
    assert len(calls) == count_model_evaluations(sampler, n, start_step)
    assert all(c.dtype == torch.long and c.shape == (SHAPE[0],) for c in calls)
    assert count_model_evaluations("heun", n) == 2 * n - 1 and count_model_evaluations("ddim", n) == n


DATA_STD = 0.7  # about the std of the clamped noise used as x0 below


def gaussian_data_model(x, t):
    """The exact ε̂ for data ~ N(0, DATA_STD² I), √(1 - ᾱ) x_t / (ᾱ DATA_STD² + 1 - ᾱ), plus a small nonlinearity."""
    alpha_bar = SCHEDULE.gather(SCHEDULE.alphas_cumprod, t, x)
    return (1 - alpha_bar).sqrt() * x / (alpha_bar * DATA_STD**2 + 1 - alpha_bar) + 0.05 * torch.tanh(x)


def test_ddim_inversion_then_sampling_reconstructs_x0():
    x0 = noise(8).clamp(-1, 1)
    errors = []
    for n in (10, 25, 50):
        x_T = ddim_invert(gaussian_data_model, x0, SCHEDULE, n, progress=False)
        assert 0.8 < x_T.std() < 1.5, "inversion should end at unit-scale noise"
        x0_again = sample(gaussian_data_model, x_T, SCHEDULE, "ddim", n, progress=False)
        errors.append((x0_again - x0).abs().max().item())
    # Inversion evaluates ε̂ one step off (at x_s, not x_t): a first-order error that shrinks like 1/n.
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.04, f"max reconstruction errors {errors}"


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m", "euler_ancestral"])
def test_img2img_start_matches_diffusers(sampler, spacing):
    """diffusers' img2img: begin at index k (× order), x = scheduler.add_noise(x0, ε, t_k), then the loop.
    Ours: x_t = schedule.add_noise(x0, ε, t_k) on the DDPM scale and start_step=k."""
    n, k = 20, 8
    x0, eps = noise(1).clamp(-1, 1), noise(2)
    scheduler = diffusers_scheduler(sampler, spacing)
    set_timesteps(scheduler, sampler, n, spacing)
    timesteps = scheduler.timesteps[k * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(k * scheduler.order)
    x = scheduler.add_noise(x0, eps, timesteps[:1])
    generator = torch.Generator().manual_seed(3)
    for t in timesteps:
        extra = dict(generator=generator) if sampler == "euler_ancestral" else {}
        x = scheduler.step(toy_model(scheduler.scale_model_input(x, t), t), t, x, **extra).prev_sample
    t_k = SCHEDULE.inference_timesteps(n, spacing, 1)[k]
    x_t = SCHEDULE.add_noise(x0, eps, int(t_k))
    ours = sample(toy_model, x_t, SCHEDULE, sampler, n, generator=torch.Generator().manual_seed(3),
                  timestep_spacing=spacing, start_step=k, progress=False)
    # σ-space samplers are not bit-exact here: diffusers adds noise in σ-space (x0 + σ ε), we as √ᾱ x0 + √(1 - ᾱ) ε, then divide by √ᾱ.
    torch.testing.assert_close(ours, x, **TOL)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun"])
def test_start_step_resumes_a_trajectory(sampler):
    """img2img's entry: from x_t at timesteps[k] (DDPM scale), the rest of a deterministic run replays."""
    states = []
    full = sample(
        toy_model, noise(), SCHEDULE, sampler, 20, callback=lambda i, t, x: states.append(x), progress=False
    )
    resumed = sample(toy_model, states[7], SCHEDULE, sampler, 20, start_step=8, progress=False)
    torch.testing.assert_close(resumed, full, atol=1e-4, rtol=0)


def test_callback_sees_every_step_in_order():
    seen = []
    sample(
        toy_model, noise(), SCHEDULE, "euler", 10, start_step=3,
        callback=lambda i, t, x: seen.append((i, t, x.shape)), progress=False,
    )
    timesteps = SCHEDULE.inference_timesteps(10, "leading", 1).tolist()
    assert seen == [(i, timesteps[i], torch.Size(SHAPE)) for i in range(3, 10)]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_any_batch_shape_works(sampler):
    """Lesson 04 draws trajectories of 2-D points: x_T of shape (B, 2)."""
    out = sample(lambda x, t: 0.5 * torch.tanh(x), noise(0, (5, 2)), SCHEDULE, sampler, 5, progress=False)
    assert out.shape == (5, 2) and torch.isfinite(out).all()


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sampler="plms"), r"sampler='plms' is unknown; use one of \('ddpm', 'ddim'"),
        (dict(num_inference_steps=0), r"num_inference_steps must be an int in \[1, 1000\]"),
        (dict(num_inference_steps=2.5), r"num_inference_steps"),
        (dict(eta=-0.1), r"eta must be a number in \[0, 1\]"),
        (dict(eta=0.5, sampler="euler"), r"eta=0.5 only applies to sampler='ddim'"),
        (dict(start_step=10), r"start_step must be an int in \[0, 9\]"),
        (dict(start_step=-1), r"start_step"),
        (dict(timestep_spacing="uniform"), r"timestep_spacing='uniform' is unknown"),
        (dict(steps_offset=-1), r"steps_offset must be an int ≥ 0"),
        (dict(x_T=torch.zeros(2, 3, 8, 8, dtype=torch.long)), r"x_T must be a floating-point tensor"),
        (dict(x_T=torch.zeros(8)), r"x_T must be a floating-point tensor"),
        (dict(model=lambda x, t: x[:, :1]), r"model must return ε̂ with the shape of x_t \(2, 3, 8, 8\)"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    args = dict(model=toy_model, x_T=noise(), schedule=SCHEDULE, sampler="ddim", num_inference_steps=10)
    args["progress"] = False
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample(**args)


def test_step_function_errors():
    x = noise()
    with pytest.raises(ValueError, match=r"eta=0.5 > 0 adds noise"):
        ddim_step(SCHEDULE, x, x, 500, 400, eta=0.5)
    with pytest.raises(ValueError, match=r"timestep must lie in \[-1, 999\]"):
        ddpm_step(SCHEDULE, x, x, 1000, 900)
    with pytest.raises(ValueError, match=r"sampler='lms' is unknown"):
        count_model_evaluations("lms", 10)
    with pytest.raises(ValueError, match=r"start_step must be an int in \[0, 9\]"):
        count_model_evaluations("heun", 10, start_step=10)
    with pytest.raises(ValueError, match=r"generator must be None or a CPU torch.Generator"):
        sample(toy_model, x, SCHEDULE, "ddpm", 10, generator=0, progress=False)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_callback_can_replace_the_state_on_every_sampler(sampler):
    """Inpainting's hook: return add_noise(x0, ε, t_next) after each step; the sampler must carry on
    from exactly that (σ-space samplers rescale it) and end on x0 itself."""
    x0, eps = noise(1).clamp(-1, 1), noise(2)
    n = 8
    timesteps = SCHEDULE.inference_timesteps(n, "leading", 1)
    calls = []

    def model(x, t):
        calls.append((int(t[0]), x.clone()))
        return toy_model(x, t)

    def paste_back(i, t, x):
        assert x.shape == x0.shape
        return SCHEDULE.add_noise(x0, eps, timesteps[i + 1].expand(x0.shape[0])) if i + 1 < n else x0

    out = sample(model, noise(3), SCHEDULE, sampler, n, generator=torch.Generator().manual_seed(0),
                 callback=paste_back, progress=False)
    torch.testing.assert_close(out, x0, rtol=0, atol=0)
    for i in range(1, n):  # the model's (last) input at timesteps[i] is the pasted state (Heun also evaluates x̃ there)
        seen = [x for t, x in calls if t == int(timesteps[i])][-1]
        expected = SCHEDULE.add_noise(x0, eps, timesteps[i].expand(x0.shape[0]))
        torch.testing.assert_close(seen, expected, atol=1e-5, rtol=1e-5, msg=f"{sampler}, step {i}")


def test_a_callback_returning_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"callback must return None or a replacement for x with shape \(2, 3, 8, 8\)"):
        sample(toy_model, noise(), SCHEDULE, "ddim", 3, callback=lambda i, t, x: x[:1], progress=False)
