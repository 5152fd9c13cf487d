"""Prediction types ε, x_0 and v (minisd.prediction): the equations, every sampler against diffusers' schedulers
with prediction_type="v_prediction" and "sample", diffusers' own published test figures, the pipeline and loader.

Tolerance against diffusers: minisd converts an x_0 or v output to ε once (``to_epsilon``) and runs its ε
samplers; diffusers converts inside each scheduler's step. The two orders of float32 operations differ: the
largest difference measured over these trajectories (states up to |x| ≈ 3.7) is 2.6e-6; we allow 1e-5 + 1e-5·|x|.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import TINY_UNET, TINY_VAE, HashEncoder, randomize
from minisd import convert, prediction, stable_diffusion
from minisd.nn import UNet
from minisd.nn.vae import AutoencoderKL
from minisd.pipeline import StableDiffusionPipeline
from minisd.prediction import PREDICTION_TYPES, to_epsilon, to_x0, training_target, v_target, wrap_model
from minisd.samplers import (SAMPLERS, ddim_invert, ddim_step, dpm_x0_pred, dpmpp_2m_step, euler_ancestral_step,
                             euler_step, heun_step, sample)
from minisd.schedules import NoiseSchedule
from minisd.sigmas import inference_sigmas
from test_samplers import SCHEDULE, TOL, diffusers_trajectory, noise, our_trajectory, perfect_denoiser, toy_model

pytestmark = pytest.mark.usefixtures("one_thread")


def pairs(seed: int = 0, shape=(2, 3, 4, 4)):
    """x_0 in [-1, 1] and ε ~ N(0, I), float64 so that the identities below hold to 1e-12."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1, torch.randn(shape, generator=g, dtype=torch.float64)


ALPHA_BARS = [0.0, 1e-4, 0.3, 0.9991, 1.0, torch.tensor([0.2, 0.7], dtype=torch.float64).reshape(2, 1, 1, 1)]


# --- the equations ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha_bar", ALPHA_BARS, ids=lambda a: "per-item" if isinstance(a, torch.Tensor) else str(a))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_every_prediction_gives_back_epsilon_and_x0(prediction_type, alpha_bar):
    """From x_t = √ᾱ x_0 + √(1 - ᾱ) ε and the exact output of each model type, both ε and x_0 come back."""
    x0, eps = pairs()
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    output = training_target(x0, eps, alpha_bar, prediction_type)
    if not (prediction_type == "sample" and torch.any(ab == 1)):  # at ᾱ = 1 x_t holds no noise to recover
        torch.testing.assert_close(to_epsilon(output, x_t, alpha_bar, prediction_type), eps, atol=1e-10, rtol=0)
    if not (prediction_type == "epsilon" and torch.any(ab == 0)):  # at ᾱ = 0 x_t holds nothing of x_0
        torch.testing.assert_close(to_x0(output, x_t, alpha_bar, prediction_type), x0, atol=1e-10, rtol=0)


def test_v_is_the_pair_rotated_and_ends_at_eps_and_minus_x0():
    """(x_t, v) is (x_0, ε) rotated by φ with cos φ = √ᾱ (Salimans & Ho, App. D): lengths are kept."""
    x0, eps = pairs(1)
    for alpha_bar in (0.05, 0.5, 0.95):
        v = v_target(x0, eps, alpha_bar)
        x_t = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps
        torch.testing.assert_close(x_t**2 + v**2, x0**2 + eps**2, atol=1e-12, rtol=0)
    torch.testing.assert_close(v_target(x0, eps, 1.0), eps)  # no noise in x_t: v is ε
    torch.testing.assert_close(v_target(x0, eps, 0.0), -x0)  # pure noise: v is -x_0
    assert torch.equal(training_target(x0, eps, 0.5, "epsilon"), eps) and torch.equal(training_target(x0, eps, 0.5, "sample"), x0)


def test_v_target_is_diffusers_velocity():
    DDPMScheduler = pytest.importorskip("diffusers").DDPMScheduler
    x0, eps = (p.float() for p in pairs(2))
    t = torch.tensor([3, 870])
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                           beta_end=0.012).get_velocity(x0, eps, t)
    ours = v_target(x0, eps, SCHEDULE.gather(SCHEDULE.alphas_cumprod, t, x0))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_low_precision_inputs_keep_the_small_noise_level():
    """In bfloat16, ᾱ_0 = 0.99915 would round to 1 and √(1 - ᾱ) to 0; the coefficients are made in float32 first."""
    x0, eps = pairs(3)
    alpha_bar = SCHEDULE.alphas_cumprod[0]
    x_t = alpha_bar.double().sqrt() * x0 + (1 - alpha_bar.double()).sqrt() * eps
    exact = to_epsilon(x0, x_t, alpha_bar.double(), "sample")
    low = to_epsilon(x0.bfloat16(), x_t.bfloat16(), alpha_bar, "sample")
    wrapped = wrap_model(lambda x, t: x0.bfloat16(), SCHEDULE, "sample")(x_t.bfloat16(), torch.zeros(2, dtype=torch.long))
    # bfloat16 keeps 8 bits: x_t - √ᾱ x_0 loses ~2^-8 of |x_t| ≈ 1, then is divided by √(1 - ᾱ) ≈ 0.029
    for out in (low, wrapped):
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert (out.double() - exact).abs().max() < 2**-8 / 0.029 * 2


# --- samplers: wrap_model and prediction_type ---------------------------------------------------------------


def as_type(eps_model, prediction_type: str):
    """The x_0- or v-model that predicts what ``eps_model``'s ε̂ implies: training_target of its x0_pred and ε̂."""
    def model(x_t, t):
        eps = eps_model(x_t, t)
        alpha_bar = SCHEDULE.gather(SCHEDULE.alphas_cumprod, t, x_t)
        return training_target(to_x0(eps, x_t, alpha_bar, "epsilon"), eps, alpha_bar, prediction_type)

    return model


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_x0_and_v_models_of_a_perfect_denoiser_land_on_the_data_point(sampler, prediction_type):
    """The perfect denoiser of tests/test_samplers.py, asked for x_0 or v: both routes end on x0* as ε does."""
    x0_star, x_T = noise(5).clamp(-1, 1), noise(6)
    model = as_type(perfect_denoiser(x0_star), prediction_type)
    runs = [sample(model, x_T, SCHEDULE, sampler, 7, torch.Generator().manual_seed(0), progress=False,
                   prediction_type=prediction_type),
            sample(wrap_model(model, SCHEDULE, prediction_type), x_T, SCHEDULE, sampler, 7,
                   torch.Generator().manual_seed(0), progress=False)]
    eps_run = sample(perfect_denoiser(x0_star), x_T, SCHEDULE, sampler, 7, torch.Generator().manual_seed(0), progress=False)
    for out in runs:
        torch.testing.assert_close(out, eps_run, atol=1e-4, rtol=0)
    if sampler != "ddim":  # SD's DDIM stops at ᾱ_0 (see test_samplers.py)
        torch.testing.assert_close(runs[0], x0_star, atol=1e-4, rtol=0)


def test_wrap_model_leaves_an_epsilon_model_alone_and_matches_prediction_type():
    assert wrap_model(toy_model, SCHEDULE, "epsilon") is toy_model
    x_T = noise(4)
    for sampler in ("ddim", "euler", "dpmpp_2m"):
        direct = sample(toy_model, x_T, SCHEDULE, sampler, 10, progress=False, prediction_type="v_prediction")
        wrapped = sample(wrap_model(toy_model, SCHEDULE, "v_prediction"), x_T, SCHEDULE, sampler, 10, progress=False)
        torch.testing.assert_close(direct, wrapped, **TOL)
        assert not torch.allclose(direct, sample(toy_model, x_T, SCHEDULE, sampler, 10, progress=False))


CASES = [(s, p) for p in ("v_prediction", "sample") for s in SAMPLERS if (s, p) != ("euler_ancestral", "sample")]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("sampler,prediction_type", CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_full_trajectory_matches_diffusers(sampler, prediction_type, n, spacing):
    """toy_model's output read as v or x_0: every state of the run against the diffusers scheduler's, same
    generator (DDPM and Euler-ancestral draw their noise in the same order)."""
    x_T = noise(n)
    theirs, their_nfe = diffusers_trajectory(sampler, n, spacing, x_T, seed=7, prediction_type=prediction_type)
    ours, out = our_trajectory(sampler, n, spacing, x_T, seed=7, prediction_type=prediction_type)
    assert len(ours) == len(theirs) == n
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"step {i}: {m}")
    assert torch.equal(out, ours[-1])


def test_euler_ancestral_with_an_x0_model_is_the_eps_model_it_implies():
    """diffusers 0.42's EulerAncestralDiscreteScheduler raises NotImplementedError for "sample": the oracle
    here is minisd's ε run of the ε̂ that the x_0-model implies (computed in float64)."""
    def x0_model(x, t):
        return 0.8 * torch.tanh(x + 0.3 * x.roll(1, dims=-1))

    def implied_eps(x, t):  # (x_t - √ᾱ x0_pred) / √(1 - ᾱ), exactly, then rounded once
        alpha_bar = SCHEDULE.gather(SCHEDULE.alphas_cumprod, t, x).double()
        return ((x.double() - alpha_bar.sqrt() * x0_model(x, t).double()) / (1 - alpha_bar).sqrt()).float()

    for spacing in ("leading", "trailing"):
        x_T = noise(9)
        ours, _ = our_trajectory("euler_ancestral", 10, spacing, x_T, 3, model=x0_model, prediction_type="sample")
        reference, _ = our_trajectory("euler_ancestral", 10, spacing, x_T, 3, model=implied_eps)
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a, b, **TOL)


def test_ddim_inversion_of_a_v_model_matches_diffusers_inverse_scheduler():
    diffusers = pytest.importorskip("diffusers")
    x0 = noise(3).clamp(-1, 1)
    ours = []
    ddim_invert(toy_model, x0, SCHEDULE, 10, callback=lambda i, t, x: ours.append(x), progress=False,
                prediction_type="v_prediction")
    inverse = diffusers.DDIMInverseScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                             beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                             steps_offset=1, prediction_type="v_prediction")
    inverse.set_timesteps(10)
    x = x0
    for a, t in zip(ours, inverse.timesteps):
        x = inverse.step(toy_model(x, t), t, x).prev_sample
        torch.testing.assert_close(a, x, **TOL)


# --- diffusers' own published figures ----------------------------------------------------------------------
# diffusers' tests/schedulers/test_scheduler_*.py run each scheduler over a full loop with SchedulerCommonTest's
# dummy model and deterministic sample (tests/schedulers/test_schedulers.py) and assert the sum and mean of |x|
# (tolerances 1e-2 and 1e-3). We run the same loops with minisd's step functions and conversions.


def dummy_sample_deter() -> torch.Tensor:
    """SchedulerCommonTest.dummy_sample_deter: arange(768) / 768 laid out (3, 8, 8, 4), permuted to (4, 3, 8, 8)."""
    num_elems = 4 * 3 * 8 * 8
    return (torch.arange(num_elems).reshape(3, 8, 8, 4) / num_elems).permute(3, 0, 1, 2)


def dummy_model(sample: torch.Tensor, t) -> torch.Tensor:
    """SchedulerCommonTest.dummy_model: sample · t / (t + 1), for t a number, 0-dim or (B,) tensor."""
    t = torch.as_tensor(t).to(sample.dtype).reshape(-1, *[1] * (sample.ndim - 1))
    return sample * t / (t + 1)


def assert_figure(x: torch.Tensor, result_sum: float | None, result_mean: float) -> None:
    """diffusers' assertions: |sum |x| - figure| < 1e-2 and |mean |x| - figure| < 1e-3."""
    if result_sum is not None:
        assert abs(x.abs().sum().item() - result_sum) < 1e-2, f"sum {x.abs().sum().item():.6f} vs published {result_sum}"
    assert abs(x.abs().mean().item() - result_mean) < 1e-3, f"mean {x.abs().mean().item():.6g} vs published {result_mean}"


def ddim_loop(prediction_type="epsilon", set_alpha_to_one=True, beta_start=0.0001) -> torch.Tensor:
    """DDIMSchedulerTest.full_loop: linear betas, 10 steps, DDIMScheduler's defaults ("leading", steps_offset 0,
    set_alpha_to_one=True). Its clip_sample=True never clips here (diffusers gives the same sums without it)."""
    schedule = NoiseSchedule(1000, beta_start, 0.02, "linear")
    timesteps = schedule.inference_timesteps(10, "leading", 0).tolist()
    x = dummy_sample_deter()
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps = to_epsilon(dummy_model(x, t), x, schedule.alphas_cumprod[t], prediction_type)
        x = ddim_step(schedule, eps, x, t, t_prev, set_alpha_to_one=set_alpha_to_one)
    return x


@pytest.mark.parametrize("kwargs,result_sum,result_mean", [
    ({}, 172.0067, 0.223967),  # test_scheduler_ddim.py, test_full_loop_no_noise
    (dict(prediction_type="v_prediction"), 52.5302, 0.0684),  # test_full_loop_with_v_prediction
    (dict(set_alpha_to_one=True, beta_start=0.01), 149.8295, 0.1951),  # test_full_loop_with_set_alpha_to_one
    (dict(set_alpha_to_one=False, beta_start=0.01), 149.0784, 0.1941),  # test_full_loop_with_no_set_alpha_to_one
])
def test_diffusers_ddim_figures(kwargs, result_sum, result_mean):
    """huggingface/diffusers tests/schedulers/test_scheduler_ddim.py."""
    assert_figure(ddim_loop(**kwargs), result_sum, result_mean)


def test_diffusers_ddim_figure_through_sample():
    """The set_alpha_to_one=False figure (SD's setting) also comes out of ``sample`` itself (steps_offset 0)."""
    schedule = NoiseSchedule(1000, 0.01, 0.02, "linear")
    assert_figure(sample(dummy_model, dummy_sample_deter(), schedule, "ddim", 10, steps_offset=0, progress=False),
                  149.0784, 0.1941)


@pytest.mark.parametrize("prediction_type,result_sum,result_mean", [
    ("epsilon", 258.9606, 0.3372),  # test_scheduler_ddpm.py, test_full_loop_no_noise
    ("v_prediction", 202.0296, 0.2631),  # test_full_loop_with_v_prediction
])
def test_diffusers_ddpm_figures_differ_only_by_clipping(prediction_type, result_sum, result_mean):
    """huggingface/diffusers tests/schedulers/test_scheduler_ddpm.py: 1000 DDPM steps, noise from
    torch.manual_seed(0). Its config has clip_sample=True, which clamps x0_pred to [-1, 1] at every step;
    minisd never clips (SD's clip_sample=False), so the figure is not minisd's: ours measures 263.3468 / 0.3429
    (ε) and 202.2979 / 0.2634 (v). With diffusers installed: the published figure is diffusers' with clipping,
    and minisd equals diffusers with clip_sample=False."""
    schedule = NoiseSchedule(1000, 0.0001, 0.02, "linear")
    ours = sample(dummy_model, dummy_sample_deter(), schedule, "ddpm", 1000, torch.Generator().manual_seed(0),
                  steps_offset=0, progress=False, prediction_type=prediction_type)
    DDPMScheduler = pytest.importorskip("diffusers").DDPMScheduler
    for clip_sample in (True, False):
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                  variance_type="fixed_small", clip_sample=clip_sample, prediction_type=prediction_type)
        x, generator = dummy_sample_deter(), torch.Generator().manual_seed(0)
        for t in reversed(range(1000)):
            x = scheduler.step(dummy_model(x, t), t, x, generator=generator).prev_sample
        if clip_sample:
            assert_figure(x, result_sum, result_mean)
        else:
            torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-5)
    assert abs(ours.abs().sum().item() - result_sum) > 0.1  # the clipping is what separates them


def diffusers_linspace_grid(schedule: NoiseSchedule, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The σ-space schedulers' default "linspace" grid in diffusers: n fractional timesteps over [0, T-1] and σ
    interpolated linearly in t (np.interp). minisd's "linspace" rounds t (one integer grid for all samplers),
    so the figures are reproduced on diffusers' grid, built here from minisd's float32 σ(t)."""
    T = schedule.num_train_timesteps
    timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    sigma_t = inference_sigmas(schedule, torch.arange(T))[:-1].numpy()
    sigmas = np.concatenate([np.interp(timesteps, np.arange(T), sigma_t), [0.0]]).astype(np.float32)
    return torch.from_numpy(timesteps), torch.from_numpy(sigmas)


def sigma_space_loop(sampler: str, timesteps, sigmas, prediction_type: str = "epsilon") -> torch.Tensor:
    """The full loop of diffusers' Euler / Euler-ancestral / Heun scheduler tests, with minisd's steps.

    Those tests write ``sample = scheduler.scale_model_input(sample, t)`` and step from that: the state is
    divided by √(σ² + 1) before every step. We do the same to reproduce their numbers (``sample`` does not).
    The dummy model sees the fractional t; generator torch.manual_seed(0) for Euler-ancestral's noise."""
    generator = torch.Generator().manual_seed(0)
    x = dummy_sample_deter() * sigmas.max()  # init_noise_sigma of "linspace"

    def eps_of(state, i):  # the scheduler treats `state` as x̄ at σ_i; its DDPM-scale x_t is state / √(σ_i² + 1)
        alpha_bar = 1 / (sigmas[i].double() ** 2 + 1)
        return to_epsilon(dummy_model(state, timesteps[i]), state * alpha_bar.sqrt().float(), alpha_bar, prediction_type)

    for i in range(len(timesteps)):
        x = x / (sigmas[i] ** 2 + 1) ** 0.5  # the tests' scale_model_input, kept as the state
        eps = eps_of(x, i)
        if sampler == "euler":
            x = euler_step(x, eps, sigmas[i], sigmas[i + 1])
        elif sampler == "euler_ancestral":
            x = euler_ancestral_step(x, eps, sigmas[i], sigmas[i + 1], torch.randn(x.shape, generator=generator))
        else:  # heun: the corrector's input is scaled by the loop too
            x = heun_step(x, eps, sigmas[i], sigmas[i + 1], lambda x_euler: eps_of(x_euler / (sigmas[i + 1] ** 2 + 1) ** 0.5, i + 1))
    return x


TEST_1100 = NoiseSchedule(1100, 0.0001, 0.02, "linear")  # the Euler/Heun tests' config: 1100 training steps


@pytest.mark.parametrize("sampler,prediction_type,result_sum,result_mean", [
    ("euler", "epsilon", 10.0807, 0.0131),  # test_scheduler_euler.py, test_full_loop_no_noise
    ("euler", "v_prediction", 0.0002, 2.2676e-06),  # test_full_loop_with_v_prediction
    ("euler_ancestral", "epsilon", 152.3192, 0.1983),  # test_scheduler_euler_ancestral.py, test_full_loop_no_noise
    ("euler_ancestral", "v_prediction", 108.4439, 0.1412),  # test_full_loop_with_v_prediction
    ("heun", "epsilon", 0.1233, 0.0002),  # test_scheduler_heun.py, test_full_loop_no_noise (cpu)
    ("heun", "v_prediction", 4.6934e-07, 6.1112e-10),  # test_full_loop_with_v_prediction (cpu)
])
def test_diffusers_sigma_space_figures(sampler, prediction_type, result_sum, result_mean):
    """huggingface/diffusers tests/schedulers/test_scheduler_{euler,euler_ancestral,heun}.py, on diffusers'
    fractional "linspace" grid (``diffusers_linspace_grid``). The v figures are ≈ 0 (the tests' rescaling
    quirk drives the state to 0), so we also check that the v run differs from the ε run."""
    timesteps, sigmas = diffusers_linspace_grid(TEST_1100, 10)
    x = sigma_space_loop(sampler, timesteps, sigmas, prediction_type)
    assert_figure(x, result_sum, result_mean)
    if prediction_type == "v_prediction":
        assert not torch.allclose(x, sigma_space_loop(sampler, timesteps, sigmas, "epsilon"))


def dpm_loop(timesteps, sigmas, prediction_type: str) -> torch.Tensor:
    """DPMSolverMultistepSchedulerTest.full_loop with minisd's DPM-Solver++(2M) step: no generator needed,
    second order from the second step on and at the last (lower_order_final=False, final σ = σ_min)."""
    x, x0_pred_prev = dummy_sample_deter(), None
    for i in range(len(timesteps)):
        eps = to_epsilon(dummy_model(x, timesteps[i]), x, 1 / (sigmas[i].double() ** 2 + 1), prediction_type)
        x0_pred = dpm_x0_pred(x, eps, sigmas[i])
        sigma_prev = sigmas[i - 1] if x0_pred_prev is not None else None
        x, x0_pred_prev = dpmpp_2m_step(x, x0_pred, x0_pred_prev, sigma_prev, sigmas[i], sigmas[i + 1]), x0_pred
    return x


@pytest.mark.parametrize("prediction_type,result_mean", [
    ("epsilon", 0.3301),  # test_scheduler_dpm_multi.py, test_full_loop_no_noise
    ("v_prediction", 0.2251),  # test_full_loop_with_v_prediction
])
def test_diffusers_dpm_multistep_figures(prediction_type, result_mean):
    """huggingface/diffusers tests/schedulers/test_scheduler_dpm_multi.py (config final_sigmas_type="sigma_min",
    lower_order_final=False). DPMSolverMultistep's "linspace" grid takes n + 1 rounded points and drops the last
    (999, 899, …, 100), unlike minisd's; the test builds it, and the final σ_min = σ(0), from minisd's σ(t)."""
    schedule = NoiseSchedule(1000, 0.0001, 0.02, "linear")
    timesteps = torch.from_numpy(np.linspace(0, 999, 11).round()[::-1][:-1].astype(np.int64).copy())
    sigmas = inference_sigmas(schedule, timesteps)
    sigmas[-1] = inference_sigmas(schedule, torch.tensor([0]))[0]  # final_sigmas_type="sigma_min"
    assert_figure(dpm_loop(timesteps, sigmas, prediction_type), None, result_mean)


# --- the pipeline and the loader ---------------------------------------------------------------------------

UNET, VAE = TINY_UNET, TINY_VAE


def tiny_pipe(prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    return StableDiffusionPipeline(randomize(UNet(UNET), 0, 0.1), randomize(AutoencoderKL(VAE), 1, 0.1), HashEncoder(),
                                   prediction_type=prediction_type)


def photo_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth (1, 3, 32, 32) image in [0, 1] and a (1, 1, 32, 32) mask that repaints a rectangle."""
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 4:20] = 1.0
    return torch.nn.functional.interpolate(coarse, size=32, mode="bilinear"), mask


def diffusers_twin(pipe: StableDiffusionPipeline, kind: str, sampler: str, **scheduler_config):
    """diffusers' pipeline of ``kind`` on the same weights, with ``convert.diffusers_scheduler(…, **scheduler_config)``."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DConditionModel(**convert.diffusers_unet_config(pipe.unet.config)).eval()
    unet.load_state_dict(pipe.unet.state_dict())
    vae = diffusers.AutoencoderKL(**convert.diffusers_vae_config(pipe.vae.config)).eval()
    vae.load_state_dict(pipe.vae.state_dict())
    cls = {"text2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    theirs = cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                 scheduler=convert.diffusers_scheduler(sampler, pipe.schedule, **scheduler_config),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return theirs


def run_both(pipe, kind: str, sampler: str, scheduler_config: dict, ours_only: dict | None = None,
             theirs_only: dict | None = None, **kwargs):
    """Our pipeline and diffusers' on the same text states, seed and arguments: (ours, theirs) images (B, 3, H, W)."""
    cond, uncond = pipe.encode_prompt(["a red letter K", "a blue letter 7"], 1, ["", "red"])
    common = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=7.5, output_type="pt", **kwargs)
    theirs = diffusers_twin(pipe, kind, sampler, **scheduler_config)(
        **common, **(theirs_only or {}), generator=torch.Generator().manual_seed(0))
    ours = pipe(**common, **(ours_only or {}), sampler=sampler, generator=torch.Generator().manual_seed(0), progress=False)
    return ours.images, theirs.images


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral", "dpmpp_2m"])
def test_a_v_prediction_pipeline_draws_what_diffusers_draws(sampler):
    """An SD 2.x-768-v-style pipeline: the U-Net's output read as v, text-to-image against diffusers' pipeline
    with prediction_type="v_prediction" in its scheduler (images in [0, 1]; allowed 1e-4, as tests/test_pipeline.py)."""
    pipe, n = tiny_pipe("v_prediction"), 6
    # DPMSolverMultistep's own "leading" grid is T // (n + 1): hand diffusers ours, as tests/test_samplers.py does
    grid = dict(num_inference_steps=None, timesteps=pipe.schedule.inference_timesteps(n, "leading", 1).tolist())
    ours, theirs = run_both(pipe, "text2img", sampler, dict(prediction_type="v_prediction"),
                            ours_only=dict(num_inference_steps=n),
                            theirs_only=grid if sampler == "dpmpp_2m" else dict(num_inference_steps=n))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    epsilon = tiny_pipe("epsilon")
    epsilon.unet = pipe.unet  # the same network read as ε draws something else
    assert not torch.allclose(epsilon(prompt_embeds=pipe.encode_prompt("a red letter K", guidance=False)[0],
                                      guidance_scale=1, num_inference_steps=n, sampler=sampler, output_type="pt",
                                      generator=torch.Generator().manual_seed(0), progress=False).images,
                              pipe(prompt_embeds=pipe.encode_prompt("a red letter K", guidance=False)[0],
                                   guidance_scale=1, num_inference_steps=n, sampler=sampler, output_type="pt",
                                   generator=torch.Generator().manual_seed(0), progress=False).images, atol=1e-3)


@pytest.fixture()
def diffusers_folder(tmp_path):
    """A diffusers-layout folder (unet/, vae/, text_encoder/, scheduler/) of a tiny SD whose scheduler config says
    v_prediction, as SD 2.1's (stabilityai/stable-diffusion-2-1/scheduler/scheduler_config.json) does."""
    diffusers = pytest.importorskip("diffusers")
    from test_stable_diffusion import CLIP, UNET as SD_UNET, VAE as SD_VAE

    unet = diffusers.UNet2DConditionModel(**convert.diffusers_unet_config(SD_UNET))
    unet.load_state_dict(randomize(UNet(SD_UNET), 0, 0.1, norms_near_one=True).state_dict())
    unet.save_pretrained(tmp_path / "sd" / "unet")
    vae = diffusers.AutoencoderKL(**convert.diffusers_vae_config(SD_VAE))
    vae.load_state_dict(randomize(AutoencoderKL(SD_VAE), 1, 0.1, norms_near_one=True).state_dict())
    vae.save_pretrained(tmp_path / "sd" / "vae")
    randomize(stable_diffusion.clip_text_model(CLIP), 2, 0.1, norms_near_one=True).save_pretrained(tmp_path / "sd" / "text_encoder")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1, prediction_type="v_prediction")
    scheduler.save_pretrained(tmp_path / "sd" / "scheduler")
    return tmp_path / "sd"


def test_a_diffusers_folder_with_a_v_scheduler_loads_as_a_v_pipeline(diffusers_folder):
    pipe = stable_diffusion.load_stable_diffusion(diffusers_folder)
    config = json.loads((diffusers_folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and pipe.prediction_type == "v_prediction"
    torch.testing.assert_close(pipe.schedule.alphas_cumprod, NoiseSchedule.stable_diffusion().alphas_cumprod, rtol=0, atol=0)
    kwargs = dict(prompt="a photo", num_inference_steps=3, output_type="pt", progress=False)
    v_image = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    forced = stable_diffusion.load_stable_diffusion(diffusers_folder, prediction_type="epsilon")  # the argument wins
    assert forced.prediction_type == "epsilon"
    assert not torch.allclose(v_image, forced(**kwargs, generator=torch.Generator().manual_seed(0)).images, atol=1e-3)
    (diffusers_folder / "scheduler" / "scheduler_config.json").unlink()  # no scheduler config: SD v1's ε
    assert stable_diffusion.load_stable_diffusion(diffusers_folder).prediction_type == "epsilon"


def test_a_single_file_keeps_its_prediction_type(tmp_path):
    """save_single_file records prediction_type in the header; an original SD file has none: the argument says it."""
    clip = dict(stable_diffusion.SD_V1_TEXT_CONFIG, hidden_size=12, intermediate_size=24, num_hidden_layers=1,
                num_attention_heads=2, projection_dim=12)
    pipe = tiny_pipe("v_prediction")
    pipe.text_encoder = stable_diffusion.CLIPTextEncoder(stable_diffusion.clip_text_model(clip))
    stable_diffusion.save_single_file(pipe, tmp_path / "v.safetensors")
    assert stable_diffusion.load_stable_diffusion(tmp_path / "v.safetensors", text_config=clip).prediction_type == "v_prediction"
    from safetensors.torch import save_file

    save_file(convert.to_compvis(pipe.unet, pipe.vae, {k: v for k, v in pipe.text_encoder.model.state_dict().items()}),
              str(tmp_path / "original.safetensors"))  # no minisd header, like an original SD file
    load = dict(unet_config=UNET, vae_config=VAE, text_config=clip)
    assert stable_diffusion.load_stable_diffusion(tmp_path / "original.safetensors", **load).prediction_type == "epsilon"
    assert stable_diffusion.load_stable_diffusion(tmp_path / "original.safetensors", **load,
                                                  prediction_type="v_prediction").prediction_type == "v_prediction"


def test_the_course_card_names_the_prediction_type(tmp_path):
    """from_pretrained reads ``schedule.prediction_type`` from the model's card (the shipped model: "epsilon")."""
    from minisd.config import asset_path

    source = asset_path("checkpoints", "t2i_glyphs.safetensors")
    card = json.loads(source.with_suffix(".json").read_text())
    assert StableDiffusionPipeline.from_pretrained(device="cpu").prediction_type == card["schedule"]["prediction_type"] == "epsilon"
    for name in ("t2i_glyphs.safetensors", "vae_f4.safetensors", "vae_f4.json"):
        shutil.copy(source.parent / name, tmp_path / name)
    card["schedule"]["prediction_type"] = "v_prediction"
    (tmp_path / "t2i_glyphs.json").write_text(json.dumps(card))
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "t2i_glyphs.safetensors", device="cpu").prediction_type == "v_prediction"


# --- bad input ---------------------------------------------------------------------------------------------


def test_unknown_prediction_types_are_named_everywhere():
    x = noise()
    match = r"prediction_type='eps' is unknown; use one of \('epsilon', 'sample', 'v_prediction'\)"
    calls = [lambda: sample(toy_model, x, SCHEDULE, "euler", 3, progress=False, prediction_type="eps"),
             lambda: ddim_invert(toy_model, x, SCHEDULE, 3, progress=False, prediction_type="eps"),
             lambda: to_epsilon(x, x, 0.5, "eps"), lambda: to_x0(x, x, 0.5, "eps"),
             lambda: training_target(x, x, 0.5, "eps"), lambda: wrap_model(toy_model, SCHEDULE, "eps"),
             lambda: tiny_pipe("eps"), lambda: convert.diffusers_scheduler("ddim", SCHEDULE, prediction_type="eps"),
             lambda: stable_diffusion.load_stable_diffusion("/nonexistent", prediction_type="eps"),
             lambda: stable_diffusion.scheduler_from_diffusers({"prediction_type": "eps"})]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


def test_bad_alpha_bar_shapes_and_schedules_are_refused():
    x = noise()
    with pytest.raises(ValueError, match=r"alpha_bar \(ᾱ\) must lie in \[0, 1\], got values from 1\.2"):
        to_epsilon(x, x, 1.2, "v_prediction")
    with pytest.raises(ValueError, match=r"noise must have the shape of x0 \(2, 3, 8, 8\), got \(2, 3, 8\)"):
        v_target(x, x[..., 0], 0.5)
    with pytest.raises(ValueError, match=r"model must return ε̂ with the shape of x_t .*prediction_type='sample'"):
        sample(lambda x, t: x[:, :1], x, SCHEDULE, "ddim", 3, progress=False, prediction_type="sample")
    with pytest.raises(ValueError, match=r"scheduler config uses \{'rescale_betas_zero_snr': True\}"):
        stable_diffusion.scheduler_from_diffusers({"rescale_betas_zero_snr": True})


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_ddpm_loss_regresses_onto_the_prediction_types_target(prediction_type):
    """Same draws of t and ε for every prediction type; only the target changes (ε, x_0 or v)."""
    from minisd.diffusion import ddpm_loss

    schedule = NoiseSchedule.stable_diffusion()
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = []

    def model(x_t, t):
        seen.append((x_t, t))
        return torch.zeros_like(x_t)

    loss = ddpm_loss(model, schedule, x0, torch.Generator().manual_seed(0), prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction_type]
    torch.testing.assert_close(seen[0][1], t)
    torch.testing.assert_close(seen[0][0], a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(loss, target.square().mean())
    with pytest.raises(ValueError, match="prediction_type"):
        ddpm_loss(model, schedule, x0, prediction_type="eps")
