"""Lesson 12's checks: right answers pass in any correct form, stubs fall back, slips are named at their sub-step."""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_right_answer_passes_and_stub_falls_back

from minisd import exercises
from minisd.exercises import ExerciseError
from minisd.pipeline import StableDiffusionPipeline, latent_mask
from minisd.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def stub(*args, **kwargs):
    raise NotImplementedError


# Correct answers in forms other than the reference's: slicing, a bool mask, torch.where, a loop-free callback.
def learner_downsample(mask, size):
    f = mask.shape[-1] // size[-1]
    return mask[..., ::f, ::f]


def learner_dilate(mask, radius):
    return F.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius) > 0.5  # bool is fine


def learner_blend(schedule, image_latents, mask, timesteps, noises, *, slip=None):
    size = image_latents.shape[-2:]
    if slip == "not_downsampled":
        m = mask.bool()
    elif slip == "max_pooled":
        m = F.max_pool2d(mask, mask.shape[-1] // size[-1]).bool()
    else:
        m = learner_downsample(mask, size).bool()
    if slip == "inverted":
        m = ~m
    last = len(timesteps) - 1

    def blend(i, t, x):
        if slip == "current":
            known = schedule.add_noise(image_latents, noises[i], t)
        elif slip == "noisy_end":
            known = schedule.add_noise(image_latents, noises[i], timesteps[min(i + 1, last)])
        elif slip == "no_end":
            known = schedule.add_noise(image_latents, noises[i], timesteps[i + 1])
        else:
            known = image_latents if i == last else schedule.add_noise(image_latents, noises[i], timesteps[i + 1])
        return torch.where(m, x, known)

    return blend


CHECKS = [
    (exercises.check_downsample_mask, learner_downsample),
    (exercises.check_dilate_mask, learner_dilate),
    (exercises.check_blend_callback, learner_blend),
]


@pytest.mark.parametrize("check, answer", CHECKS)
def test_right_answers_pass_and_stubs_fall_back_to_a_reference_that_passes(check, answer, capsys):
    assert_right_answer_passes_and_stub_falls_back(check, answer, capsys)


def test_the_reference_callback_is_the_pipelines_blend_with_fixed_noise():
    """The reference callback in samplers.sample = StableDiffusionPipeline's inpainting (blend_noise='fixed')."""
    from helpers import assert_right_answer_passes_and_stub_falls_back, randomize
    from test_pipeline import UNET, VAE, HashEncoder, mask, photo  # the pipeline tests' tiny models
    from minisd import samplers
    from minisd.nn import UNet
    from minisd.nn.vae import AutoencoderKL
    from minisd.pipeline import classifier_free_guidance

    pipe = StableDiffusionPipeline(randomize(UNet(UNET), 0, 0.1), randomize(AutoencoderKL(VAE), 1, 0.1), HashEncoder())
    n, g = 5, torch.Generator().manual_seed(0)
    theirs = pipe("a red letter K", image=photo(), mask_image=mask(), num_inference_steps=n, blend_noise="fixed",
                  output_type="latent", generator=torch.Generator().manual_seed(0), progress=False).images
    image_latents = pipe.vae.encode(photo() * 2 - 1).sample(g) * VAE.scaling_factor
    noise = torch.randn(image_latents.shape, generator=g)
    cond, uncond = pipe.encode_prompt("a red letter K")
    timesteps = pipe.schedule.inference_timesteps(n, "leading", 1)
    callback = exercises.reference_make_blend_callback(pipe.schedule, image_latents, mask(), timesteps,
                                                       noise.expand(n, *noise.shape))
    ours = samplers.sample(classifier_free_guidance(pipe.unet, cond, uncond, 7.5), noise, pipe.schedule, "ddim", n,
                           callback=callback, progress=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(exercises.reference_downsample_mask(mask(), (8, 8)), latent_mask(mask(), (8, 8)))


def _slip_message(check, slip) -> str:
    with pytest.raises(ExerciseError) as error:
        check(slip)
    return str(error.value)


@pytest.mark.parametrize("slip, words", [
    (lambda mask, size: F.interpolate(mask, size=size, mode="bilinear"), "(bilinear)"),
    (lambda mask, size: F.adaptive_avg_pool2d(mask, size), "block averages"),
    (lambda mask, size: F.adaptive_max_pool2d(mask, size), "that dilates the mask"),
    (lambda mask, size: F.interpolate(mask, size=size, mode="nearest-exact"), "block's centre"),
    (lambda mask, size: 1 - F.interpolate(mask, size=size), "inverted"),
])
def test_downsample_mask_slips_are_named(slip, words):
    message = _slip_message(exercises.check_downsample_mask, slip)
    assert "`downsample_mask`" in message and words in message, message


@pytest.mark.parametrize("slip, words", [
    (lambda mask, radius: -F.max_pool2d(-mask, 2 * radius + 1, stride=1, padding=radius), "erosion"),
    (lambda mask, radius: F.max_pool2d(mask, 2 * radius + 1, stride=1), "pad by the radius"),
    (lambda mask, radius: F.max_pool2d(mask, 4 * radius + 1, stride=1, padding=2 * radius), "grew by 2·radius"),
])
def test_dilate_mask_slips_are_named(slip, words):
    message = _slip_message(exercises.check_dilate_mask, slip)
    assert "`dilate_mask`" in message and words in message, message


@pytest.mark.parametrize("slip, words", [
    ("not_downsampled", "downsample the mask to x's size first"),
    ("max_pooled", "downsampled by max-pooling"),
    ("inverted", "the mask is inverted"),
    ("current", "noised to the CURRENT timestep t = 801"),
    ("noisy_end", "after the LAST step x is clean"),
    ("no_end", "there is no timesteps[i + 1]"),
])
def test_blend_callback_slips_are_named_at_their_step(slip, words):
    def answer(*args):
        return learner_blend(*args, slip=slip)

    message = _slip_message(exercises.check_blend_callback, answer)
    assert "`make_blend_callback`" in message and words in message, message


def test_a_callback_that_forgets_to_return_or_a_builder_that_returns_nothing_is_explained():
    assert "forget the `return`" in _slip_message(exercises.check_blend_callback, lambda *args: (lambda i, t, x: None))
    assert "return the function blend" in _slip_message(exercises.check_blend_callback, lambda *args: None)
