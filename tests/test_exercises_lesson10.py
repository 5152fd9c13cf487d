"""Lesson 10's checks: right answers pass in any correct form, stubs fall back, slips are named (the first
sub-step that differs)."""

import pytest
import torch

from minisd import exercises, pipeline
from minisd.exercises import ExerciseError
from minisd.exercises.lesson10 import RecordingTextEncoder, RecordingUNet

pytestmark = pytest.mark.usefixtures("one_thread")


def stub(*args, **kwargs):
    raise NotImplementedError


def _message(check, answer) -> str:
    with pytest.raises(ExerciseError) as error:
        check(answer)
    return str(error.value)


# ----------------------------------------------------------------------------- classifier_free_guidance


def cfg_no_special_case(unet, prompt_embeds, negative_prompt_embeds, guidance_scale):
    """Right, written differently: no w = 1 shortcut, repeat instead of cat, (1 − w) ε_u + w ε_c."""
    states = torch.cat([negative_prompt_embeds, prompt_embeds])

    def model(x_t, t):
        eps = unet(x_t.repeat(2, 1, 1, 1), t.repeat(2), states)
        eps_uncond, eps_cond = eps.chunk(2)
        return (1 - guidance_scale) * eps_uncond + guidance_scale * eps_cond

    return model


def cfg_cond_first(unet, prompt_embeds, negative_prompt_embeds, guidance_scale):
    """Right, but [cond, uncond], split the same way."""
    def model(x_t, t):
        eps_cond, eps_uncond = unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                    encoder_hidden_states=torch.cat([prompt_embeds, negative_prompt_embeds])).chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    return model


def cfg_slip(**change):
    """The reference with one sub-step changed."""
    def factory(unet, prompt_embeds, negative_prompt_embeds, guidance_scale):
        def model(x_t, t):
            if change.get("two_calls"):
                eps_uncond = unet(x_t, t, encoder_hidden_states=negative_prompt_embeds)
                eps_cond = unet(x_t, t, encoder_hidden_states=prompt_embeds)
            else:
                latents = x_t if change.get("latents_once") else torch.cat([x_t, x_t])
                timesteps = t if change.get("t_once") else torch.cat([t, t])
                if change.get("states_interleaved"):  # [u0, c0, u1, c1]: not the order of the latents
                    states = torch.stack([negative_prompt_embeds, prompt_embeds], 1).flatten(0, 1)
                elif change.get("cond_first"):
                    states = torch.cat([prompt_embeds, negative_prompt_embeds])
                else:
                    states = torch.cat([negative_prompt_embeds, prompt_embeds])
                eps = unet(latents, timesteps, encoder_hidden_states=states)
                if change.get("no_split"):
                    return eps
                eps_uncond, eps_cond = eps.chunk(2)
            w = guidance_scale
            if change.get("w_on_cond"):
                return eps_uncond + w * eps_cond
            return eps_uncond + w * (eps_cond - eps_uncond)

        return model

    return factory


@pytest.mark.parametrize("answer", [pipeline.classifier_free_guidance, cfg_no_special_case, cfg_cond_first])
def test_right_guidance_answers_pass_with_or_without_the_w1_shortcut(answer, capsys):
    assert exercises.check_classifier_free_guidance(answer) is answer
    out = capsys.readouterr().out
    assert "✅" in out
    if answer is cfg_no_special_case:
        assert "w = 1 runs the batched call too" in out
    if answer is cfg_cond_first:
        assert "[cond, uncond]" in out


def test_a_guidance_stub_falls_back_to_the_pipelines_function(capsys):
    reference = exercises.check_classifier_free_guidance(stub)
    assert reference is pipeline.classifier_free_guidance
    assert "not written yet" in capsys.readouterr().out


@pytest.mark.parametrize("change, words", [
    ("two_calls", "2 U-Net calls (batches of [2, 2]) instead of one"),
    ("cond_first", "the halves are the wrong way round"),
    ("states_interleaved", "text states not in the same order as the latents"),
    ("t_once", "the timesteps were not doubled"),
    ("latents_once", "the latents were not doubled"),
    ("w_on_cond", "w was applied to ε_c instead of the difference"),
    ("no_split", "split it into its halves"),
])
def test_guidance_slips_are_named_at_the_first_sub_step_that_differs(change, words):
    message = _message(exercises.check_classifier_free_guidance, cfg_slip(**{change: True}))
    assert "`classifier_free_guidance`" in message and words in message, message


def test_the_recording_unet_depends_on_latents_timestep_and_text():
    x, t, c = torch.randn(2, 4, 4, 4), torch.tensor([10, 900]), torch.randn(2, 3, 6)
    eps = RecordingUNet()(x, t, c)
    for other in (RecordingUNet()(x.flip(0), t, c), RecordingUNet()(x, t.flip(0), c), RecordingUNet()(x, t, c.flip(0))):
        assert not torch.allclose(eps, other)


# ----------------------------------------------------------------------------- encode_prompt


def encode_two_calls(text_encoder, prompt, negative_prompt, num_images_per_prompt):
    """Right, written differently: two encoder calls, repeat + view as diffusers does."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
    halves = []
    for texts in (prompts, negatives):
        e = text_encoder.encode(texts)
        halves.append(e.repeat(1, num_images_per_prompt, 1).view(len(texts) * num_images_per_prompt, *e.shape[1:]))
    return tuple(halves)


def encode_slip(**change):
    def answer(text_encoder, prompt, negative_prompt, num_images_per_prompt):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if change.get("none_negative"):
            negatives = [negative_prompt] * len(prompts)
        elif isinstance(negative_prompt, list):
            negatives = negative_prompt
        elif change.get("no_broadcast"):
            negatives = [negative_prompt or ""]
        else:
            negatives = [negative_prompt or ""] * len(prompts)
        cond, uncond = text_encoder.encode(prompts), text_encoder.encode(negatives)
        n = 1 if change.get("no_repeat") else num_images_per_prompt
        if change.get("tile"):
            return cond.repeat(n, 1, 1), uncond.repeat(n, 1, 1)
        return cond.repeat_interleave(n, 0), uncond.repeat_interleave(n, 0)

    return answer


def test_right_encode_answers_pass_and_the_stub_falls_back(capsys):
    assert exercises.check_encode_prompt(encode_two_calls) is encode_two_calls
    reference = exercises.check_encode_prompt(stub)
    assert reference is not stub and exercises.check_encode_prompt(reference) is reference
    out = capsys.readouterr().out
    assert "not written yet" in out and out.count("✅") == 2


def test_the_encode_fallback_is_the_pipelines_encode_prompt():
    encoder = RecordingTextEncoder()
    cond, uncond = exercises.check_encode_prompt(stub)(encoder, ["a", "b"], "red", 2)
    assert cond.shape == uncond.shape == (4, 3, 6)
    torch.testing.assert_close(uncond[3], encoder.states_of("red"))
    torch.testing.assert_close(cond[1], encoder.states_of("a"))


@pytest.mark.parametrize("change, words", [
    ("none_negative", "A missing negative prompt is the empty prompt"),
    ("no_repeat", "Repeat each prompt's states num_images_per_prompt = 3 times"),
    ("tile", "repeat_interleave(n, dim=0), not repeat"),
    ("no_broadcast", "A single negative prompt (or \"\") applies to every prompt"),
])
def test_encode_slips_are_named(change, words):
    message = _message(exercises.check_encode_prompt, encode_slip(**{change: True}))
    assert "`encode_prompt`" in message and words in message, message


# ----------------------------------------------------------------------------- mean_pairwise_distance


def distance_loops(images):
    """Right, written with loops and floats."""
    n, total, pairs = len(images), 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            total += ((images[i] - images[j]) ** 2).mean().sqrt().item()
            pairs += 1
    return total / pairs


def test_right_distance_answers_pass_and_the_stub_falls_back(capsys):
    assert exercises.check_mean_pairwise_distance(distance_loops) is distance_loops
    reference = exercises.check_mean_pairwise_distance(stub)
    assert reference is exercises.mean_pairwise_distance
    flat = torch.stack([torch.full((3, 2, 2), v) for v in (-1.0, 1.0, 1.0)])
    assert reference(flat).item() == pytest.approx((2 + 2 + 0) / 3)  # pairs (−1, 1), (−1, 1), (1, 1)
    assert "not written yet" in capsys.readouterr().out


def _all_pairs(images):
    x = images.flatten(1)
    return (x[:, None] - x[None]).pow(2).mean(-1)  # (N, N) mean squared distance


@pytest.mark.parametrize("slip, words", [
    (lambda images: _all_pairs(images).sqrt().mean(), "the diagonal"),
    (lambda images: _all_pairs(images)[tuple(torch.triu_indices(len(images), len(images), 1))].mean(), "mean squared distance"),
    (lambda images: (_all_pairs(images)[tuple(torch.triu_indices(len(images), len(images), 1))]
                     * images[0].numel()).sqrt().mean(), "mean, not sum"),
    (lambda images: _all_pairs(images).sqrt(), "expected one number"),
])
def test_distance_slips_are_named(slip, words):
    message = _message(exercises.check_mean_pairwise_distance, slip)
    assert "`mean_pairwise_distance`" in message and words in message, message
