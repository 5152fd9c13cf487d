"""Schedules against diffusers' DDPMScheduler (the oracle) and their error messages."""

import numpy as np
import pytest
import torch

from minisd.schedules import SD_BETA_END, SD_BETA_START, NoiseSchedule

CONFIGS = [
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=SD_BETA_START, beta_end=SD_BETA_END),
    dict(beta_schedule="squaredcos_cap_v2"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["beta_schedule"])
def test_betas_and_alpha_bar_match_diffusers(config):
    ours = NoiseSchedule(1000, **config)
    theirs = pytest.importorskip("diffusers").DDPMScheduler(num_train_timesteps=1000, **config)
    torch.testing.assert_close(ours.betas, theirs.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, atol=1e-6, rtol=0)


def test_cosine_is_an_alias_of_squaredcos_cap_v2():
    assert torch.equal(NoiseSchedule(beta_schedule="cosine").betas, NoiseSchedule(beta_schedule="squaredcos_cap_v2").betas)


def test_stable_diffusion_schedule_and_its_nonzero_terminal_snr():
    schedule = NoiseSchedule.stable_diffusion()
    assert schedule.beta_schedule == "scaled_linear"
    assert abs(schedule.betas[0].item() - 0.00085) < 1e-8 and abs(schedule.betas[-1].item() - 0.012) < 1e-7
    # ᾱ_T ≈ 0.0047 (Lin et al. 2024, table 1): x_T still carries √ᾱ_T ≈ 0.068 of the image.
    assert 0.004 < schedule.alphas_cumprod[-1].item() < 0.0055


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["beta_schedule"])
def test_derived_quantities_are_consistent(config):
    s = NoiseSchedule(1000, **config)
    torch.testing.assert_close(s.snr, s.alphas_cumprod / (1 - s.alphas_cumprod))
    torch.testing.assert_close(s.sigmas**2, 1 / s.snr, rtol=1e-4, atol=0)
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]), "ᾱ_t must fall strictly"
    assert torch.all(s.snr[1:] < s.snr[:-1])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["beta_schedule"])
def test_add_noise_matches_diffusers(config):
    ours = NoiseSchedule(1000, **config)
    theirs = pytest.importorskip("diffusers").DDPMScheduler(num_train_timesteps=1000, **config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    # A single int t applies to the whole batch.
    torch.testing.assert_close(ours.add_noise(x0, noise, 300), theirs.add_noise(x0, noise, torch.full((6,), 300)))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_inference_steps", [1, 15, 30, 50, 1000])
def test_inference_timesteps_match_diffusers_ddim(spacing, num_inference_steps):
    if spacing == "leading" and num_inference_steps == 1000:
        # SD's steps_offset=1 would reach t = 1000, past the last timestep: we refuse, diffusers
        # returns it (and fails later when it looks up ᾱ_1000). The error says how to get all 1000.
        with pytest.raises(ValueError, match=r"t = 1000, past the last training step 999: use steps_offset=0"):
            NoiseSchedule.stable_diffusion().inference_timesteps(1000, "leading", steps_offset=1)
        return
    sd = dict(beta_schedule="scaled_linear", beta_start=SD_BETA_START, beta_end=SD_BETA_END)
    theirs = pytest.importorskip("diffusers").DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0, **sd)
    theirs.set_timesteps(num_inference_steps)
    ours = NoiseSchedule.stable_diffusion().inference_timesteps(
        num_inference_steps, spacing, steps_offset=1 if spacing == "leading" else 0
    )
    assert ours.tolist() == theirs.timesteps.tolist()
    assert np.all(np.diff(ours.numpy()) < 0), "noisiest first, strictly falling"


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: NoiseSchedule(beta_schedule="quadratic"), ["beta_schedule", "'quadratic'", "scaled_linear", "cosine"]),
        (lambda: NoiseSchedule(num_train_timesteps=1), ["num_train_timesteps", "≥ 2"]),
        (lambda: NoiseSchedule(beta_start=0.5, beta_end=0.1), ["beta_start", "beta_end"]),
        (lambda: NoiseSchedule().add_noise(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), 1000), ["t must lie in [0, 999]", "1000"]),
        (lambda: NoiseSchedule().add_noise(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), -1), ["[0, 999]"]),
        (lambda: NoiseSchedule().add_noise(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), 0.5), ["integer timesteps"]),
        (lambda: NoiseSchedule().add_noise(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.tensor([1, 2, 3])), ["one per batch item", "(2,)", "(3,)"]),
        (lambda: NoiseSchedule().add_noise(torch.zeros(2, 1, 4, 4), torch.zeros(2, 3, 4, 4), 5), ["noise", "(2, 1, 4, 4)", "(2, 3, 4, 4)"]),
        (lambda: NoiseSchedule().inference_timesteps(0), ["num_inference_steps", "[1, 1000]"]),
        (lambda: NoiseSchedule().inference_timesteps(10, "random"), ["timestep_spacing", "leading", "trailing", "linspace"]),
    ],
)
def test_bad_arguments_name_the_argument_and_the_accepted_values(call, words):
    with pytest.raises(ValueError) as error:
        call()
    for word in words:
        assert word in str(error.value), f"{word!r} missing from: {error.value}"
