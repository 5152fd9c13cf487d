"""Lesson 11's checks: right answers pass in any correct form, stubs fall back, slips are named at their sub-step."""

import pytest
import torch

from helpers import assert_right_answer_passes_and_stub_falls_back

from minisd import exercises, samplers
from minisd.exercises import ExerciseError
from minisd.pipeline import img2img_start
from minisd.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def stub(*args, **kwargs):
    raise NotImplementedError


# Correct answers in forms other than the reference's: a posterior sample, encode_latents, keywords, a loop.
def learner_start(num_inference_steps, strength):
    steps = int(num_inference_steps * strength)
    return max(num_inference_steps - steps, 0)


def learner_image_to_image(model, vae, schedule, image, strength, num_inference_steps, noise, *, slip=None):
    n = num_inference_steps
    init_timestep = min(int(n * strength), n)
    start = init_timestep if slip == "index" else n - init_timestep
    if slip == "unscaled":
        latents = vae.encode(image).sample()
    else:
        latents = vae.encode_latents(image, sample_posterior=True)  # σ = e^-15 in the check's VAE: same as the mean
    if start == n:
        return latents
    timesteps = schedule.inference_timesteps(n, "leading", 0 if slip == "offset" else 1)
    t0 = timesteps[start] if slip != "next" else timesteps[start + 1]
    x = noise if slip == "pure" else schedule.add_noise(latents, noise, t0)
    if slip == "no_start_step":
        return samplers.sample(model, x, schedule, "ddim", n, progress=False)
    out = samplers.sample(model, x, schedule, num_inference_steps=n, start_step=start, progress=False)
    return out if slip != "decoded" else vae.decode(out / vae.config.scaling_factor)


def learner_invert(model, latents, schedule, num_inference_steps, start_step, *, slip=None):
    up = schedule.inference_timesteps(num_inference_steps, "leading", 1).flip(0)
    steps = num_inference_steps - start_step + (1 if slip == "extra" else 0) - (1 if slip == "missing" else 0)
    x, s = latents, -1
    for t in up[:steps].tolist():
        if slip == "missing" and s == -1:
            s = int(up[0])
            continue
        t_model = s if slip == "from" else t
        eps = model(x, torch.full((x.shape[0],), t_model))
        x = samplers.ddim_step(schedule, eps, x, *((t, s) if slip == "swapped" else (s, t)))
        s = t
    return x


CHECKS = [
    (exercises.check_img2img_start, learner_start),
    (exercises.check_image_to_image, learner_image_to_image),
    (exercises.check_ddim_invert_to, learner_invert),
]


@pytest.mark.parametrize("check, answer", CHECKS)
def test_right_answers_pass_and_stubs_fall_back_to_a_reference_that_passes(check, answer, capsys):
    assert_right_answer_passes_and_stub_falls_back(check, answer, capsys)


def test_the_references_are_diffusers_rule_and_the_library_inversion():
    assert exercises.check_img2img_start(stub) is img2img_start
    schedule = NoiseSchedule.stable_diffusion()
    model = lambda x, t: 0.2 * x + 1e-3 * t.float()[:, None, None, None]  # noqa: E731
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    whole_way = samplers.ddim_invert(model, z, schedule, 8, progress=False)
    torch.testing.assert_close(exercises.reference_ddim_invert_to(model, z, schedule, 8, 0), whole_way, rtol=0, atol=0)


def _slip_message(check, slip) -> str:
    with pytest.raises(ExerciseError) as error:
        check(slip)
    return str(error.value)


@pytest.mark.parametrize("slip, words", [
    (lambda n, s: min(int(n * s), n), "the number of steps to TAKE"),
    (lambda n, s: n - min(round(n * s), n), "you rounded"),
    (lambda n, s: n - int(n * s) + 1, "expected 10 = n − min(int(n · strength), n)"),
    (lambda n, s: None, "forget the `return`"),
])
def test_img2img_start_slips_are_named(slip, words):
    message = _slip_message(exercises.check_img2img_start, slip)
    assert "`img2img_start`" in message and words in message, message


@pytest.mark.parametrize("slip, words", [
    ("index", "You started at index int(n · strength) = 6"),
    ("unscaled", "the latents are not scaled"),
    ("offset", "without SD's steps_offset = 1"),
    ("next", "(the timestep AFTER the start)"),
    ("pure", "started from the noise alone"),
    ("no_start_step", "pass start_step=4 to samplers.sample"),
    ("decoded", "return the latents (B, 4, h, w)"),
])
def test_image_to_image_slips_are_named_at_their_sub_step(slip, words):
    def answer(*args):
        return learner_image_to_image(*args, slip=slip)

    message = _slip_message(exercises.check_image_to_image, answer)
    assert "`image_to_image`" in message and words in message, message


@pytest.mark.parametrize("slip, words", [
    ("extra", "stopping at timesteps[4] = 501 takes 6"),
    ("missing", "the first step goes from z_0"),
    ("from", "at the level you step FROM"),
    ("swapped", "x after 1 inversion step"),
])
def test_ddim_invert_to_slips_are_named(slip, words):
    def answer(*args):
        return learner_invert(*args, slip=slip)

    message = _slip_message(exercises.check_ddim_invert_to, answer)
    assert "`ddim_invert_to`" in message and words in message, message


def test_errors_in_learner_code_are_explained_with_the_input():
    message = _slip_message(exercises.check_image_to_image, lambda *args: 1 / 0)
    assert "raised ZeroDivisionError" in message and "strength=0.6" in message


def test_sampling_when_no_step_is_left_gets_a_hint():
    def answer(model, vae, schedule, image, strength, num_inference_steps, noise):
        start = img2img_start(num_inference_steps, strength)
        timesteps = schedule.inference_timesteps(num_inference_steps, "leading", 1)
        x = schedule.add_noise(vae.encode_latents(image), noise, timesteps[min(start, num_inference_steps - 1)])
        return samplers.sample(model, x, schedule, "ddim", num_inference_steps, start_step=start, progress=False)

    message = _slip_message(exercises.check_image_to_image, answer)
    assert "strength=0.05" in message and "there is no step to take" in message, message
