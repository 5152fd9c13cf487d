"""Karras σ spacing (minisd.sigmas): eq. 5 in closed form, the grid and timesteps against diffusers'
``use_karras_sigmas=True``, whole sampling runs step for step, diffusers' published figures, and refusals.

Timesteps: diffusers' EulerDiscrete and HeunDiscrete schedulers give the model the fractional t read back from
each Karras σ; minisd's models take integer t, so ``sample`` rounds it (DPMSolverMultistep rounds t itself).
The parity runs therefore hand diffusers' loop a model that rounds t: then every state is bit-identical for ε
(≤ 1e-6 for v; tolerance 1e-5 + 1e-5·|x| as in tests/test_samplers.py). What the rounding alone changes is
measured below: with diffusers' fractional t the toy model's states move by ≤ 2e-3, a tiny random U-Net's
images by ≤ 3e-5, and on the shipped text-to-image model (4 prompts, CFG 7.5) the decoded images in [0, 1] by
at most 6.4e-3 (Euler, 10 steps; mean 2.3e-4) and 1.8e-2 (Heun, 10 steps; mean 3.5e-4).
"""

import math

import numpy as np
import pytest
import torch

from minisd import convert
from minisd.samplers import KARRAS_SAMPLERS, SAMPLERS, sample
from minisd.schedules import NoiseSchedule
from minisd.sigmas import inference_sigmas, karras_sigmas, sampling_grid
from test_prediction import TEST_1100, assert_figure, dpm_loop, photo_and_mask, run_both, sigma_space_loop, tiny_pipe
from test_samplers import SCHEDULE, TOL, diffusers_scheduler, diffusers_trajectory, noise, our_trajectory, toy_model

pytestmark = pytest.mark.usefixtures("one_thread")


def rounding_t(model):
    """``model`` fed round(t): what minisd's sample() hands its model on a Karras grid."""
    return lambda x, t: model(x, torch.round(torch.as_tensor(t, dtype=torch.float64)))


# --- eq. 5 and the σ ↔ t map ------------------------------------------------------------------------------


def test_karras_sigmas_follow_eq_5():
    sigma_min, sigma_max, rho = 0.0292, 14.6146, 7.0
    sigmas = karras_sigmas(sigma_min, sigma_max, 10)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (10,)
    assert math.isclose(sigmas[0], sigma_max, rel_tol=1e-12) and math.isclose(sigmas[-1], sigma_min, rel_tol=1e-12)
    steps = sigmas ** (1 / rho)  # evenly spaced in σ^(1/ρ) ...
    torch.testing.assert_close(steps.diff(), torch.full((9,), (sigma_min ** (1 / rho) - sigma_max ** (1 / rho)) / 9,
                                                        dtype=torch.float64))
    assert (sigmas.diff() < 0).all() and sigmas.diff()[-1] > sigmas.diff()[0]  # ... so the steps shrink at low σ
    torch.testing.assert_close(karras_sigmas(1.0, 5.0, 5, rho=1.0), torch.linspace(5.0, 1.0, 5, dtype=torch.float64))
    assert karras_sigmas(1.0, 5.0, 1).shape == (1,) and math.isclose(karras_sigmas(1.0, 5.0, 1)[0], 5.0, rel_tol=1e-12)
    below = karras_sigmas(sigma_min, sigma_max, 10, rho=3.0)  # a smaller ρ puts less of the grid at low noise
    assert (below[1:-1] > sigmas[1:-1]).all()


def test_karras_sigmas_equal_diffusers_convert_to_karras():
    EulerDiscreteScheduler = pytest.importorskip("diffusers").EulerDiscreteScheduler
    in_sigmas = torch.tensor([14.614640235900879, 0.029167532920837402])
    for n in (1, 2, 10, 50):
        theirs = EulerDiscreteScheduler()._convert_to_karras(in_sigmas=in_sigmas, num_inference_steps=n)
        assert np.array_equal(karras_sigmas(in_sigmas[-1].item(), in_sigmas[0].item(), n).numpy(), theirs)


def test_sigma_to_timestep_inverts_sigma_of_t():
    sigma_t = inference_sigmas(SCHEDULE, torch.arange(1000))[:-1].double()
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    torch.testing.assert_close(SCHEDULE.sigma_to_timestep(sigma_t[t]), t.double(), atol=1e-4, rtol=0)
    halfway = (sigma_t[t[:-1]] * sigma_t[t[:-1] + 1]).sqrt()  # geometric mean: half way in log σ
    torch.testing.assert_close(SCHEDULE.sigma_to_timestep(halfway), t[:-1].double() + 0.5, atol=1e-4, rtol=0)
    ends = SCHEDULE.sigma_to_timestep(torch.tensor([0.0, 1e-6, 1e6]))
    assert ends.tolist() == [0.0, 0.0, 999.0]  # clamped to [0, T-1]
    many = SCHEDULE.sigma_to_timestep(karras_sigmas(0.03, 14.6, 50))
    assert (many.diff() < 0).all()


def test_sigma_to_timestep_equals_diffusers():
    EulerDiscreteScheduler = pytest.importorskip("diffusers").EulerDiscreteScheduler
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    log_sigmas = np.log(np.array(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5))
    sigmas = np.concatenate([[0.0, 1e-3], np.exp(np.random.default_rng(0).uniform(-4, 3, 200)), [20.0]])
    theirs = np.array([scheduler._sigma_to_t(s, log_sigmas) for s in sigmas])
    assert np.array_equal(SCHEDULE.sigma_to_timestep(torch.from_numpy(sigmas)).numpy(), theirs)


# --- the grid against diffusers -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 10, 25, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_the_grid_is_diffusers_karras_grid(sampler, spacing, n):
    """σ's bit for bit, and timesteps = diffusers' t rounded (DPMSolverMultistep: its own, already rounded).
    Euler/Heun take σ_max, σ_min from the spacing's grid; DPM-Solver from the whole schedule (see sampling_grid)."""
    scheduler = diffusers_scheduler(sampler, spacing, use_karras_sigmas=True)
    scheduler.set_timesteps(n)
    sigmas, timesteps = scheduler.sigmas, scheduler.timesteps
    if sampler == "heun":  # HeunDiscrete repeats every level but the first for its corrector
        sigmas, timesteps = torch.cat([sigmas[:1], sigmas[1::2]]), torch.cat([timesteps[:1], timesteps[1::2]])
    ours_t, ours_sigmas = sampling_grid(SCHEDULE, sampler, n, spacing, 1, use_karras_sigmas=True)
    assert torch.equal(ours_sigmas, sigmas) and ours_sigmas[-1] == 0
    assert torch.equal(ours_t, torch.round(timesteps.double()).long())
    if spacing == "leading" and sampler != "dpmpp_2m" and n == 10:  # SD's grid, n = 10: σ(901) … σ(1)
        assert ours_t[0] == 901 and ours_t[-1] == 1


def diffusers_karras_scheduler(sampler: str, spacing: str, n: int, prediction_type: str):
    """diffusers' scheduler with use_karras_sigmas=True, its timesteps set. EulerAncestralDiscreteScheduler has no
    such option in diffusers 0.42: it gets EulerDiscreteScheduler's Karras σ's and timesteps (what minisd uses)."""
    if sampler != "euler_ancestral":
        scheduler = diffusers_scheduler(sampler, spacing, use_karras_sigmas=True, prediction_type=prediction_type)
        scheduler.set_timesteps(n)
        return scheduler
    euler = diffusers_scheduler("euler", spacing, use_karras_sigmas=True)
    euler.set_timesteps(n)
    scheduler = diffusers_scheduler("euler_ancestral", spacing, prediction_type=prediction_type)
    scheduler.set_timesteps(n)
    scheduler.sigmas, scheduler.timesteps = euler.sigmas, euler.timesteps
    return scheduler


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", KARRAS_SAMPLERS)
def test_full_trajectory_matches_diffusers(sampler, prediction_type, n, spacing):
    x_T = noise(n)
    scheduler = diffusers_karras_scheduler(sampler, spacing, n, prediction_type)
    theirs, _ = diffusers_trajectory(sampler, n, spacing, x_T, seed=7, model=rounding_t(toy_model), scheduler=scheduler)
    ours, out = our_trajectory(sampler, n, spacing, x_T, seed=7, prediction_type=prediction_type, use_karras_sigmas=True)
    assert len(ours) == len(theirs) == n
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"step {i}: {m}")
    plain, _ = our_trajectory(sampler, n, spacing, x_T, seed=7, prediction_type=prediction_type)
    assert not torch.allclose(plain[-1], out, atol=1e-3)  # Karras σ's do change the run


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_rounding_t_changes_only_the_time_conditioning(sampler):
    """diffusers' own loop with the fractional t against minisd (rounded t): the runs differ, but only through
    the model's t (toy_model: +0.2 t/1000 · x, so Δt ≤ 0.5 moves ε̂ by ≤ 1e-4 |x|); measured ≤ 2.1e-3."""
    for n, spacing in ((10, "leading"), (25, "trailing")):
        x_T = noise(n)
        fractional, _ = diffusers_trajectory(sampler, n, spacing, x_T, 7, use_karras_sigmas=True)
        ours, _ = our_trajectory(sampler, n, spacing, x_T, 7, use_karras_sigmas=True)
        difference = max((a - b).abs().max().item() for a, b in zip(ours, fractional))
        print(f"{sampler}, {n} steps ({spacing}): max |minisd − diffusers with fractional t| = {difference:.2e}")
        assert 0 < difference < 5e-3


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun"])
def test_start_step_resumes_a_karras_trajectory(sampler):
    """img2img's entry on a Karras grid: from the state after step k (DDPM scale), the rest replays (not for
    dpmpp_2m, whose multistep memory starts afresh; its img2img is checked against diffusers' below)."""
    states = []
    full = sample(toy_model, noise(), SCHEDULE, sampler, 12, torch.Generator().manual_seed(1),
                  callback=lambda i, t, x: states.append(x), progress=False, use_karras_sigmas=True)
    if sampler == "euler_ancestral":  # stochastic: replay the generator up to step 5 to draw the same noise after
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            torch.randn(noise().shape, generator=generator)
    else:
        generator = None
    resumed = sample(toy_model, states[4], SCHEDULE, sampler, 12, generator, start_step=5, progress=False,
                     use_karras_sigmas=True)
    torch.testing.assert_close(resumed, full, atol=1e-4, rtol=0)


# --- diffusers' own published figures ----------------------------------------------------------------------


@pytest.mark.parametrize("sampler,result_sum,result_mean", [
    ("euler", 124.52299499511719, 0.16213932633399963),  # test_scheduler_euler.py, test_full_loop_device_karras_sigmas
    ("heun", 0.00015, 1.9869554535034695e-07),  # test_scheduler_heun.py, test_full_loop_device_karras_sigmas
])
def test_diffusers_karras_figures(sampler, result_sum, result_mean):
    """huggingface/diffusers tests/schedulers/test_scheduler_{euler,heun}.py, use_karras_sigmas=True: minisd's
    grid (``sampling_grid``, σ's from ``karras_sigmas``), minisd's steps, the tests' loop (``sigma_space_loop``)
    and their dummy model, which is fed the fractional t = ``sigma_to_timestep(σ)`` as diffusers feeds it.

    ``sample`` rounds t: on the same loop that gives 124.5121 / 0.162125 for Euler, 0.0105 below the published
    sum (outside diffusers' 1e-2), and 0.000153 / 1.9867e-07 for Heun: the dummy model, t / (t + 1) · x, is
    very sensitive to t near 0, where the last Karras steps are."""
    _, grid = sampling_grid(TEST_1100, sampler, 10, "linspace", use_karras_sigmas=True)
    sigma_max, sigma_min = inference_sigmas(TEST_1100, torch.tensor([1099, 0]))[:2].tolist()
    sigmas = karras_sigmas(sigma_min, sigma_max, 10)
    assert torch.equal(grid, torch.cat([sigmas.float(), torch.zeros(1)]))
    timesteps = TEST_1100.sigma_to_timestep(sigmas).float()  # fractional, as diffusers computes them
    assert_figure(sigma_space_loop(sampler, timesteps, grid), result_sum, result_mean)


def test_diffusers_dpm_karras_v_figure():
    """huggingface/diffusers tests/schedulers/test_scheduler_dpm_multi.py, test_full_loop_with_karras_and_v_prediction
    (mean 0.2096): minisd's Karras grid for dpmpp_2m (σ(999) … σ(0), rounded t: 999, 937, …, 18, 0) with the test's
    final σ_min instead of minisd's 0, and minisd's DPM-Solver++(2M) step."""
    schedule = NoiseSchedule(1000, 0.0001, 0.02, "linear")
    timesteps, sigmas = sampling_grid(schedule, "dpmpp_2m", 10, use_karras_sigmas=True)
    assert timesteps.tolist() == [999, 937, 864, 775, 663, 511, 301, 102, 18, 0]
    sigmas[-1] = inference_sigmas(schedule, torch.tensor([0]))[0]  # final_sigmas_type="sigma_min"
    assert_figure(dpm_loop(timesteps, sigmas, "v_prediction"), None, 0.2096)


# --- the pipeline -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text2img", "img2img", "inpaint"])
def test_dpm_pp_2m_karras_pipeline_draws_what_diffusers_draws(kind):
    """The WebUI's "DPM++ 2M Karras": DPMSolverMultistepScheduler(use_karras_sigmas=True) in diffusers' three SD
    pipelines, on the same weights and text states (DPM-Solver rounds t itself: no difference from t)."""
    pipe = tiny_pipe()
    image, mask = photo_and_mask()
    extra = {"text2img": {}, "img2img": dict(image=image, strength=0.6), "inpaint": dict(image=image, mask_image=mask)}[kind]
    ours_only = dict(use_karras_sigmas=True, **({"blend_noise": "fixed"} if kind == "inpaint" else {}))
    ours, theirs = run_both(pipe, kind, "dpmpp_2m", dict(use_karras_sigmas=True), ours_only=ours_only,
                            num_inference_steps=6, **extra)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    plain = pipe(**{k: v for k, v in extra.items()}, prompt="a red letter K", sampler="dpmpp_2m", num_inference_steps=6,
                 output_type="pt", generator=torch.Generator().manual_seed(0), progress=False).images
    karras = pipe(**{k: v for k, v in extra.items()}, prompt="a red letter K", sampler="dpmpp_2m", num_inference_steps=6,
                  output_type="pt", generator=torch.Generator().manual_seed(0), progress=False,
                  use_karras_sigmas=True).images
    assert not torch.allclose(plain, karras, atol=1e-4)


def test_euler_karras_pipeline_differs_from_diffusers_only_by_rounded_t():
    """diffusers' Euler gives its U-Net fractional t; ours rounds: images in [0, 1] measured ≤ 3e-5 apart."""
    ours, theirs = run_both(tiny_pipe(), "text2img", "euler", dict(use_karras_sigmas=True),
                            ours_only=dict(use_karras_sigmas=True), num_inference_steps=6)
    print(f"Euler Karras, 6 steps: max |minisd − diffusers| = {(ours - theirs).abs().max().item():.2e}")
    assert (ours - theirs).abs().max() < 1e-3


# --- refusals ---------------------------------------------------------------------------------------------


def test_bad_karras_arguments_are_named():
    x = noise()
    for sampler in ("ddpm", "ddim"):
        with pytest.raises(ValueError, match=rf"use_karras_sigmas=True applies to samplers \('euler', "
                                             rf"'euler_ancestral', 'heun', 'dpmpp_2m'\), not sampler='{sampler}'"):
            sample(toy_model, x, SCHEDULE, sampler, 5, progress=False, use_karras_sigmas=True)
    with pytest.raises(ValueError, match=r"use_karras_sigmas must be True or False, got 'yes'"):
        sample(toy_model, x, SCHEDULE, "euler", 5, progress=False, use_karras_sigmas="yes")
    with pytest.raises(ValueError, match=r"use_karras_sigmas=True applies to samplers .* not sampler='ddim'"):
        tiny_pipe()(prompt="a", sampler="ddim", use_karras_sigmas=True, progress=False)
    for kwargs, match in [(dict(sigma_min=0.0), r"need 0 < sigma_min ≤ sigma_max < inf, got sigma_min=0.0"),
                          (dict(sigma_min=2.0), r"need 0 < sigma_min ≤ sigma_max < inf, got sigma_min=2.0, sigma_max=1.0"),
                          (dict(num_inference_steps=0), r"num_inference_steps must be an int ≥ 1, got 0"),
                          (dict(rho=0), r"rho must be a number > 0 \(Karras et al. use 7\), got 0")]:
        with pytest.raises(ValueError, match=match):
            karras_sigmas(**dict(dict(sigma_min=0.1, sigma_max=1.0, num_inference_steps=5), **kwargs))
    for sampler in ("ddim", "euler_ancestral"):
        with pytest.raises(ValueError, match=rf"diffusers' scheduler for sampler='{sampler}' has no use_karras_sigmas"):
            convert.diffusers_scheduler(sampler, SCHEDULE, use_karras_sigmas=True)
    assert set(KARRAS_SAMPLERS) == set(SAMPLERS) - {"ddpm", "ddim"}
