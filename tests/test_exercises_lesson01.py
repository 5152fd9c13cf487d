"""Lesson 01's third exercise, the whole forward chain: right answers pass in any correct form (any draw
order), the stub falls back to a reference that works where the lesson uses it, and each typical slip is
named. (The checks of q_step and add_noise are tested in test_exercises.py.)"""

import functools

import pytest
import torch

from minisd import diffusion, exercises
from minisd.exercises import ExerciseError
from minisd.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def stub(*args, **kwargs):
    raise NotImplementedError


def q_step(x_prev, noise, beta_t):
    """The lesson's exercise 1, as a learner writes it."""
    beta_t = torch.as_tensor(beta_t)
    return (1 - beta_t).sqrt() * x_prev + beta_t.sqrt() * noise


def forward_chain(schedule, x0, t, generator, *, steps=None, beta_at=None, noise="fresh", alpha_bar_of=None,
                  closed_form=False, only_x=False):
    """The chain as a learner writes it (one randn like x per step, ᾱ as a running product); keywords make slips."""
    x, alpha_bar, first = x0, 1.0, None
    for s in range(t + 1) if steps is None else steps(t):
        beta_s = schedule.betas[s if beta_at is None else beta_at(s, t)].item()
        z = torch.randn(x.shape) if noise == "no generator" else torch.randn(x.shape, generator=generator)
        first = z if first is None else first
        x = q_step(x, first if noise == "once" else 0.5 + 0.3 * z if noise == "shifted" else z, beta_s)
        alpha_bar *= 1 - beta_s if alpha_bar_of is None else alpha_bar_of(beta_s)
    if closed_form:
        x = schedule.add_noise(x0, first, t)
    return x if only_x else (x, alpha_bar)


def forward_chain_vectorised(schedule, x0, t, generator):
    """Another correct form: all the noise in one draw, used last step first; ᾱ from a cumprod."""
    noise = torch.randn((t + 1, *x0.shape), generator=generator).flip(0)
    x = x0
    for s in range(t + 1):
        x = q_step(x, noise[s], schedule.betas[s])
    return x, torch.cumprod(1 - schedule.betas[: t + 1], dim=0)[-1]


def test_forward_chain_check_accepts_the_loop_and_another_draw_order(capsys):
    assert exercises.check_forward_chain(forward_chain) is forward_chain
    assert "differ" not in capsys.readouterr().out
    assert exercises.check_forward_chain(forward_chain_vectorised) is forward_chain_vectorised
    out = capsys.readouterr().out
    assert "✅" in out and "Your draws differ from the reference's" in out and "that is fine" in out


def test_forward_chain_stub_falls_back_to_the_chain_as_the_lesson_uses_it(capsys):
    reference = exercises.check_forward_chain(stub)
    assert reference is not stub and "not written yet" in capsys.readouterr().out
    assert exercises.check_forward_chain(reference) is reference
    schedule, x0 = NoiseSchedule(), torch.randn(3, 3, 8, 8)
    x_t, alpha_bar = reference(schedule, x0, 300, torch.Generator().manual_seed(0))  # positional, as the lesson
    torch.testing.assert_close(x_t, diffusion.forward_chain(schedule, x0, 300, torch.Generator().manual_seed(0)))
    assert float(alpha_bar) == pytest.approx(float(torch.prod(1 - schedule.betas[:301].double())), rel=1e-5)


SLIPS = {
    "one step short": (dict(steps=lambda t: range(t)), "it is ᾱ_\\{t-1\\}: steps 0, 1, …, t are t \\+ 1 steps"),
    "β_t at every step": (dict(beta_at=lambda s, t: t), "its own β_s: schedule.betas\\[s\\], not betas\\[t\\]"),
    "√ᾱ": (dict(alpha_bar_of=lambda b: (1 - b) ** 0.5), "that is √ᾱ_t, the signal weight"),
    "product of the β": (dict(alpha_bar_of=lambda b: b), "multiply the \\(1 − β_s\\), not the β_s"),
    "the same noise": (dict(noise="once"), "the same noise at every step: draw fresh noise inside the loop"),
    "the closed form": (dict(closed_form=True), "that is the closed form, one draw"),
    "no generator": (dict(noise="no generator"), "two runs with generators in the same state differ"),
    "not N(0, I)": (dict(noise="shifted"), "x_t has mean .* q\\(x_t \\| x_0\\) \\(eq. 4\\) has"),
    "x only": (dict(only_x=True), "returned a Tensor; return a pair \\(x_t, alpha_bar_t\\)"),
}


@pytest.mark.parametrize("name", SLIPS)
def test_forward_chain_slips_are_named(name):
    slip, words = SLIPS[name]
    with pytest.raises(ExerciseError, match=words):
        exercises.check_forward_chain(functools.partial(forward_chain, **slip))


def test_forward_chain_x_one_step_off_with_the_right_alpha_bar_is_named():
    def extra_step(schedule, x0, t, generator):
        x, _ = forward_chain(schedule, x0, t + 1, generator)
        return x, schedule.alphas_cumprod[t]

    with pytest.raises(ExerciseError, match="x_t is wrong: one step too many"):
        exercises.check_forward_chain(extra_step)

    def no_step(schedule, x0, t, generator):
        return x0, schedule.alphas_cumprod[t]

    with pytest.raises(ExerciseError, match="x_t is wrong: x_t is x0"):
        exercises.check_forward_chain(no_step)
