"""The exercise checks: a right answer passes, a stub falls back, a wrong answer is explained."""

import pytest
import torch

from minisd import exercises, schedules
from minisd.diffusion import q_step
from minisd.exercises import ExerciseError


def stub(*args, **kwargs):
    raise NotImplementedError


def learner_add_noise(schedule, x0, noise, t):
    alpha_bar_t = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * noise


def learner_leading(num_inference_steps, num_train_timesteps, steps_offset):
    step = num_train_timesteps // num_inference_steps
    return [i * step + steps_offset for i in reversed(range(num_inference_steps))]


def test_a_right_answer_is_returned_and_confirmed(capsys):
    assert exercises.check_add_noise(learner_add_noise) is learner_add_noise
    assert exercises.check_q_step(q_step) is q_step
    assert exercises.check_leading_timesteps(learner_leading) is learner_leading  # a list is fine
    assert exercises.check_scaled_linear_betas(schedules.scaled_linear_betas) is schedules.scaled_linear_betas
    assert exercises.check_cosine_betas(schedules.cosine_betas) is schedules.cosine_betas
    assert capsys.readouterr().out.count("✅") == 5


@pytest.mark.parametrize(
    "check",
    [exercises.check_q_step, exercises.check_add_noise, exercises.check_scaled_linear_betas,
     exercises.check_cosine_betas, exercises.check_leading_timesteps],
)
def test_a_stub_hands_back_a_working_reference(check, capsys):
    reference = check(stub)
    assert reference is not stub
    assert "not written yet" in capsys.readouterr().out
    assert check(reference) is reference  # the reference passes its own check


def test_the_fallback_keeps_the_exercise_defaults():
    # Lesson 02 calls leading_timesteps(15): the reference must accept the same short call.
    assert exercises.check_leading_timesteps(stub)(15)[0].item() == 925


def test_wrong_values_say_where_what_was_expected_and_what_came():
    def forgot_sqrt(schedule, x0, noise, t):
        alpha_bar_t = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return alpha_bar_t * x0 + (1 - alpha_bar_t) * noise

    with pytest.raises(ExerciseError) as error:
        exercises.check_add_noise(forgot_sqrt)
    message = str(error.value)
    for words in ["`add_noise`", "wrong values", "expected", "got", "input", "t=tensor([0, 10, 500, 999])"]:
        assert words in message, message


def test_wrong_shape_gets_a_broadcasting_hint():
    def no_reshape(schedule, x0, noise, t):
        alpha_bar_t = schedule.alphas_cumprod[t]  # (B,) does not broadcast against (B, C, H, W)
        return (alpha_bar_t.sqrt() * x0.flatten(1).T).T

    with pytest.raises(ExerciseError, match=r"returned shape \(4, 192\), expected \(4, 3, 8, 8\)"):
        exercises.check_add_noise(no_reshape)


def test_missing_return_and_errors_in_learner_code_are_explained():
    with pytest.raises(ExerciseError, match="forget the `return`"):
        exercises.check_q_step(lambda x_prev, noise, beta_t: None)
    with pytest.raises(ExerciseError, match="raised ZeroDivisionError"):
        exercises.check_q_step(lambda x_prev, noise, beta_t: 1 / 0)
    off_by_one = lambda num_inference_steps, num_train_timesteps, steps_offset: torch.tensor(
        learner_leading(num_inference_steps, num_train_timesteps, 0))
    with pytest.raises(ExerciseError, match="expected 925, got 924"):
        exercises.check_leading_timesteps(off_by_one)
