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
    tensor_leading = lambda num_inference_steps, num_train_timesteps, steps_offset: torch.tensor(
        learner_leading(num_inference_steps, num_train_timesteps, steps_offset))
    assert exercises.check_leading_timesteps(tensor_leading) is tensor_leading
    assert exercises.check_scaled_linear_betas(schedules.scaled_linear_betas) is schedules.scaled_linear_betas
    assert exercises.check_cosine_betas(schedules.cosine_betas) is schedules.cosine_betas
    assert capsys.readouterr().out.count("✅") == 5


def test_leading_timesteps_must_be_a_tensor_of_ints_as_the_lesson_uses_it():
    # Lesson 02 indexes sigmas with the answer and calls .tolist() on it: a list would crash there.
    with pytest.raises(ExerciseError, match=r"returned a list; return a tensor of ints.*\.tolist\(\)"):
        exercises.check_leading_timesteps(learner_leading)
    as_floats = lambda num_inference_steps, num_train_timesteps, steps_offset: torch.tensor(
        learner_leading(num_inference_steps, num_train_timesteps, steps_offset), dtype=torch.float32)
    with pytest.raises(ExerciseError, match="dtype torch.float32"):
        exercises.check_leading_timesteps(as_floats)


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


# --- Lesson 03 -----------------------------------------------------------------------------------


def test_lesson03_checks_accept_the_papers_forms_and_reject_common_slips():
    import math

    def embedding(timesteps, dim):
        angles = timesteps[:, None].float() * torch.exp(-math.log(10_000) * torch.arange(dim // 2) / (dim // 2))
        return torch.cat([angles.cos(), angles.sin()], dim=-1)

    def sines_first(timesteps, dim):
        return embedding(timesteps, dim).roll(dim // 2, dims=-1)

    assert exercises.check_timestep_embedding(embedding) is embedding
    with pytest.raises(ExerciseError, match="timestep_embedding"):
        exercises.check_timestep_embedding(sines_first)

    def step(schedule, eps_pred, x_t, t, noise):  # DDPM eq. 11 with σ_t² = β̃_t
        beta_t, alpha_bar_t = schedule.betas[t], schedule.alphas_cumprod[t]
        alpha_bar_prev = schedule.alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0)
        mean = (x_t - beta_t / (1 - alpha_bar_t).sqrt() * eps_pred) / (1 - beta_t).sqrt()
        return mean + ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t).sqrt() * noise

    def beta_variance(schedule, eps_pred, x_t, t, noise):  # σ_t² = β_t: the other choice in the paper
        beta_t, alpha_bar_t = schedule.betas[t], schedule.alphas_cumprod[t]
        return (x_t - beta_t / (1 - alpha_bar_t).sqrt() * eps_pred) / (1 - beta_t).sqrt() + beta_t.sqrt() * noise

    assert exercises.check_ddpm_step(step) is step
    with pytest.raises(ExerciseError, match="ddpm_step"):
        exercises.check_ddpm_step(beta_variance)


@pytest.mark.parametrize("check", [exercises.check_timestep_embedding, exercises.check_ddpm_loss, exercises.check_ddpm_step])
def test_lesson03_stubs_fall_back(check, capsys):
    reference = check(stub)
    assert reference is not stub and "not written yet" in capsys.readouterr().out


def draws(schedule, x0, generator, t, noise, noise_first=False):
    """t and ε as the exercise draws them: on the CPU from generator, then moved to x0's device."""
    order = ("noise", "t") if noise_first else ("t", "noise")
    for name in order:
        if name == "t" and t is None:
            t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        if name == "noise" and noise is None:
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    return t, noise


def learner_loss(model, schedule, x0, generator=None, t=None, noise=None):
    t, noise = draws(schedule, x0, generator, t, noise)
    return torch.nn.functional.mse_loss(model(schedule.add_noise(x0, noise, t), t), noise)


def learner_loss_noise_first(model, schedule, x0, generator=None, t=None, noise=None):
    t, noise = draws(schedule, x0, generator, t, noise, noise_first=True)
    return torch.nn.functional.mse_loss(model(schedule.add_noise(x0, noise, t), t), noise)


def test_ddpm_loss_check_supplies_the_draws_and_accepts_either_draw_order(capsys):
    assert exercises.check_ddpm_loss(learner_loss) is learner_loss
    assert "differ" not in capsys.readouterr().out  # the reference's order: t, then ε
    assert exercises.check_ddpm_loss(learner_loss_noise_first) is learner_loss_noise_first
    out = capsys.readouterr().out
    assert "✅" in out and "Your draws differ from the reference's" in out and "that is fine" in out


def test_ddpm_loss_check_hands_its_draws_to_the_learner_on_the_check_device(monkeypatch):
    """The given-draws cases pass t and noise explicitly, built on config.get_device() with x0."""
    from minisd.exercises import lesson03

    seen = []

    def spy(model, schedule, x0, generator=None, t=None, noise=None):
        seen.append((x0.device, None if t is None else t.device, None if noise is None else noise.device))
        return learner_loss(model, schedule, x0, generator, t, noise)

    monkeypatch.setattr(lesson03, "get_device", lambda: torch.device("cpu"))
    exercises.check_ddpm_loss(spy)
    given = [s for s in seen if s[1] is not None]
    assert len(given) == 2 and all(d == (torch.device("cpu"),) * 3 for d in given)
    assert any(s[1] is None and s[2] is None for s in seen)  # and once with a generator only


@pytest.mark.parametrize("slip, words", [
    (lambda model, schedule, x0, generator=None, t=None, noise=None: learner_loss(model, schedule, x0, generator),
     "use the `t` and `noise` passed in"),  # ignores the given draws
    (lambda model, schedule, x0, generator=None, t=None, noise=None: learner_loss(
        model, schedule, x0, None, t, noise if noise is not None else torch.randn_like(x0)), "reproducible"),  # no generator
    (lambda model, schedule, x0, generator=None, t=None, noise=None: learner_loss(
        model, schedule, x0, generator, t, noise) * x0[0].numel(), "wrong values"),  # a sum over pixels, not a mean
    (lambda model, schedule, x0, generator=None, t=None, noise=None: learner_loss(
        model, schedule, x0, generator, t if t is not None else torch.randint(0, 100, (x0.shape[0],), generator=generator),
        noise), "uniformly"),  # only the first 100 timesteps
    (lambda model, schedule, x0, generator=None, t=None, noise=None: learner_loss(
        model, schedule, x0, generator, t, noise if noise is not None else torch.rand(x0.shape, generator=generator)),
     "standard deviation"),  # uniform noise instead of Gaussian
])
def test_ddpm_loss_slips_are_explained(slip, words):
    with pytest.raises(ExerciseError, match=words):
        exercises.check_ddpm_loss(slip)


def test_ddpm_loss_fallback_follows_the_signature_the_lesson_uses():
    from minisd.schedules import NoiseSchedule

    reference = exercises.check_ddpm_loss(stub)
    model = lambda x_t, t: torch.zeros_like(x_t)
    x0, schedule = torch.zeros(4, 1, 8, 8), NoiseSchedule()
    positional = reference(model, schedule, x0, torch.Generator().manual_seed(0))  # as the Trainer's lambda calls it
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    given = reference(model, schedule, x0, t=torch.zeros(4, dtype=torch.long), noise=noise)
    assert positional.item() == pytest.approx(1.0, abs=0.3) and given.item() == pytest.approx(noise.pow(2).mean().item())


# --- Lesson 04: samplers ------------------------------------------------------------------------


def learner_ddim_step(schedule, eps_pred, x_t, t, t_prev):
    alpha_bar_t, alpha_bar_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t_prev]
    x0_pred = (x_t - (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_bar_t.sqrt()
    return alpha_bar_prev.sqrt() * x0_pred + (1 - alpha_bar_prev).sqrt() * eps_pred


def learner_euler_step(x, eps_pred, sigma, sigma_next):
    return x + (sigma_next - sigma) * eps_pred


def test_lesson04_right_answers_are_returned_and_confirmed(capsys):
    assert exercises.check_ddim_step(learner_ddim_step) is learner_ddim_step
    assert exercises.check_euler_step(learner_euler_step) is learner_euler_step
    assert capsys.readouterr().out.count("✅") == 2


@pytest.mark.parametrize("check", [exercises.check_ddim_step, exercises.check_euler_step])
def test_lesson04_a_stub_hands_back_a_working_reference(check, capsys):
    reference = check(stub)
    assert reference is not stub
    assert "not written yet" in capsys.readouterr().out
    assert check(reference) is reference


def test_lesson04_the_fallbacks_take_the_lessons_calls():
    # Lesson 04 calls ddim_step(schedule, eps, x, t, t_prev) and euler_step(x, eps, sigma, sigma_next).
    from minisd import samplers
    from minisd.schedules import NoiseSchedule

    schedule, x, eps = NoiseSchedule(), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    ddim = exercises.check_ddim_step(stub)
    assert torch.equal(ddim(schedule, eps, x, 999, 979), samplers.ddim_step(schedule, eps, x, 999, 979))
    sigmas = samplers.inference_sigmas(schedule, schedule.inference_timesteps(10, "trailing"))
    euler = exercises.check_euler_step(stub)
    assert torch.allclose(euler(x, eps, sigmas[0], sigmas[1]), learner_euler_step(x, eps, sigmas[0], sigmas[1]), atol=1e-4)


def test_lesson04_wrong_answers_say_where_and_what():
    def forgot_sqrt(schedule, eps_pred, x_t, t, t_prev):
        alpha_bar_t, alpha_bar_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t_prev]
        x0_pred = (x_t - (1 - alpha_bar_t) * eps_pred) / alpha_bar_t
        return alpha_bar_prev * x0_pred + (1 - alpha_bar_prev) * eps_pred

    with pytest.raises(ExerciseError) as error:
        exercises.check_ddim_step(forgot_sqrt)
    message = str(error.value)
    for words in ["`ddim_step`", "wrong values", "expected", "got", "t=999", "t_prev=979"]:
        assert words in message, message

    def wrong_direction(x, eps_pred, sigma, sigma_next):
        return x + (sigma - sigma_next) * eps_pred

    with pytest.raises(ExerciseError, match="`euler_step` on input high noise"):
        exercises.check_euler_step(wrong_direction)


# ----------------------------------------------------------------------------- lessons 05 and 06


def learner_reparameterize(mean, logvar, noise):
    return mean + (0.5 * logvar).exp() * noise


def learner_kl(mean, logvar):
    return -0.5 * torch.sum(1 + logvar - mean**2 - logvar.exp(), dim=(1, 2, 3))  # the VAE paper's form


def learner_scaling_factor(latents):
    return 1 / latents.flatten().std()


def learner_psnr(a, b, data_range=2.0):
    return 20 * torch.log10(data_range / (a - b).pow(2).mean(dim=(1, 2, 3)).sqrt())


def learner_frechet(mu_a, sigma_a, mu_b, sigma_b):
    import scipy.linalg

    root = torch.from_numpy(scipy.linalg.sqrtm((sigma_a @ sigma_b).numpy()).real)
    return ((mu_a - mu_b) ** 2).sum() + sigma_a.trace() + sigma_b.trace() - 2 * root.trace()


LESSON_05_06 = [
    (exercises.check_reparameterize, learner_reparameterize),
    (exercises.check_kl_divergence, learner_kl),
    (exercises.check_scaling_factor, learner_scaling_factor),
    (exercises.check_psnr, learner_psnr),
    (exercises.check_frechet_distance, learner_frechet),
]


@pytest.mark.parametrize("check, answer", LESSON_05_06)
def test_lessons_05_06_right_answers_pass_and_stubs_fall_back(check, answer, capsys):
    assert check(answer) is answer
    reference = check(stub)
    assert reference is not stub and check(reference) is reference
    out = capsys.readouterr().out
    assert "not written yet" in out and out.count("✅") == 2


@pytest.mark.parametrize("check, slip, words", [
    (exercises.check_reparameterize, lambda mean, logvar, noise: mean + logvar * noise, "reparameterize"),  # σ² for σ
    (exercises.check_kl_divergence, lambda mean, logvar: learner_kl(mean, logvar) / 16, "kl_divergence"),  # a mean
    (exercises.check_scaling_factor, lambda latents: latents.std(), "scaling_factor"),  # forgot the 1/
    (exercises.check_psnr, lambda a, b, data_range=2.0: 10 * torch.log10(data_range / (a - b).pow(2).mean((1, 2, 3))),
     "psnr"),  # L instead of L²
    (exercises.check_frechet_distance,
     lambda mu_a, sigma_a, mu_b, sigma_b: ((mu_a - mu_b) ** 2).sum(), "frechet_distance"),  # means only
])
def test_lessons_05_06_common_slips_are_caught(check, slip, words):
    with pytest.raises(ExerciseError, match=words):
        check(slip)


# ----------------------------------------------------------------------------- the shared machinery (core)


def test_call_learner_passes_stubs_through_and_explains_other_errors():
    from minisd.exercises.core import call_learner

    with pytest.raises(NotImplementedError):
        call_learner("f", stub, {}, "input one")
    g = torch.Generator().manual_seed(0)
    first = call_learner("f", lambda generator: torch.randn(2, generator=generator), {"generator": g}, "input one")
    again = call_learner("f", lambda generator: torch.randn(2, generator=generator), {"generator": g}, "input one")
    assert torch.equal(first, again)  # each call gets a fresh copy of the generator
    with pytest.raises(ExerciseError, match=r"`f` raised ZeroDivisionError: division by zero\n  on input one, hint"):
        call_learner("f", lambda: 1 / 0, {}, "input one", lambda error: ", hint")
