"""Lesson 04's checks: right answers pass in any correct form, stubs fall back, slips are named with their hint
(for DPM-Solver++(2M): at the first step that diverges)."""

import math
import re

import pytest
import torch

from minisd import exercises, samplers
from minisd.exercises import ExerciseError
from minisd.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def stub(*args, **kwargs):
    raise NotImplementedError


# ----------------------------------------------------------------------------- ddim_step


def ddim_sqrt(schedule, eps_pred, x_t, t, t_prev):
    ab, ab_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t_prev]
    x0_pred = (x_t - (1 - ab).sqrt() * eps_pred) / ab.sqrt()
    return ab_prev.sqrt() * x0_pred + (1 - ab_prev).sqrt() * eps_pred


def ddim_in_sigma_space(schedule, eps_pred, x_t, t, t_prev):
    """Another correct form: DDIM is Euler in σ-space (lesson 04), written with schedule.sigmas."""
    sigma, sigma_prev = schedule.sigmas[t], schedule.sigmas[t_prev]
    x_bar = x_t / schedule.sqrt_alphas_cumprod[t]
    return (x_bar + (sigma_prev - sigma) * eps_pred) * schedule.sqrt_alphas_cumprod[t_prev]


@pytest.mark.parametrize("answer", [ddim_sqrt, ddim_in_sigma_space])
def test_ddim_step_accepts_correct_forms(answer, capsys):
    assert exercises.check_ddim_step(answer) is answer
    assert "✅" in capsys.readouterr().out


def _ddim(slip):
    def answer(schedule, eps_pred, x_t, t, t_prev):
        ab, ab_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t_prev]
        if slip == "alphas":
            ab = schedule.alphas[t]
        root = (lambda v: v) if slip == "no sqrt" else torch.sqrt
        sign = 1 if slip == "plus" else -1
        x0_pred = (x_t + sign * root(1 - ab) * eps_pred) / root(ab)
        if slip == "x0":
            return x0_pred
        return root(ab_prev) * x0_pred + (0 if slip == "no eps term" else root(1 - ab_prev) * eps_pred)
    return answer


DDIM_SLIPS = {"no sqrt": "enters through square roots", "x0": "you returned x0_pred",
              "plus": "x0_pred removes the noise", "alphas": re.escape("not α_t = schedule.alphas[t]"),
              "no eps term": "the second term is missing"}


@pytest.mark.parametrize("slip", DDIM_SLIPS)
def test_ddim_step_slips_are_named(slip):
    with pytest.raises(ExerciseError, match=DDIM_SLIPS[slip]) as error:
        exercises.check_ddim_step(_ddim(slip))
    assert "`ddim_step` on input" in str(error.value) and "expected" in str(error.value)


# ----------------------------------------------------------------------------- euler_step


def euler_plain(x, eps_pred, sigma, sigma_next):
    return x + (sigma_next - sigma) * eps_pred


def euler_through_denoiser(x, eps_pred, sigma, sigma_next):
    """Karras' Algorithm 1 as written: D = x̄ - σ ε̂, d = (x̄ - D) / σ."""
    denoised = x - sigma * eps_pred
    d = (x - denoised) / sigma
    return x + d * (sigma_next - sigma)


@pytest.mark.parametrize("answer", [euler_plain, euler_through_denoiser])
def test_euler_step_accepts_correct_forms(answer):
    assert exercises.check_euler_step(answer) is answer


EULER_SLIPS = {
    "direction": (lambda x, eps_pred, sigma, sigma_next: x + (sigma - sigma_next) * eps_pred, "σ falls"),
    "denoised": (lambda x, eps_pred, sigma, sigma_next: x - sigma * eps_pred, "you returned D"),
    "divided": (lambda x, eps_pred, sigma, sigma_next: x + (sigma_next - sigma) * eps_pred / sigma,
                "do not divide by σ again"),
    "sigma_next only": (lambda x, eps_pred, sigma, sigma_next: x + sigma_next * eps_pred, re.escape("the *change* of σ")),
}


@pytest.mark.parametrize("slip", EULER_SLIPS)
def test_euler_step_slips_are_named(slip):
    answer, message = EULER_SLIPS[slip]
    with pytest.raises(ExerciseError, match=message):
        exercises.check_euler_step(answer)


# ----------------------------------------------------------------------------- dpmpp_2m


def dpmpp_2m(model, x_T, sigmas, timesteps, slip=None):
    """A written-out DPM-Solver++(2M) loop; ``slip`` makes one of the mistakes learners make."""
    x, x0_prev, lam_prev, eps_prev, sigma_prev = x_T, None, None, None, None
    first_x0 = first_lam = None
    n = len(timesteps) - (slip == "skip last step")
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        scale = {"scaled input": sigma, "scaled input sqrt": (sigma**2 + 1) ** 0.5}.get(slip, 1.0)
        if slip in ("scaled input", "scaled input sqrt") and i == 0:
            x = x * scale
        eps = model(x, timesteps[i + 1] if slip == "wrong t" and i + 1 < n else timesteps[i])
        if slip == "heun-like" and i == 1:
            model(x, timesteps[i])
        a, s = 1 / (sigma**2 + 1) ** 0.5, sigma / (sigma**2 + 1) ** 0.5
        x0 = {"x0 sigma-space": x - sigma * eps, "x0 no sqrt": (x - s**2 * eps) / a**2}.get(slip, (x - s * eps) / a)
        if sigma_next == 0 and slip != "no last special case":
            return x if slip == "last returns x" else x0
        a_n, s_n = 1 / (sigma_next**2 + 1) ** 0.5, sigma_next / (sigma_next**2 + 1) ** 0.5
        lam, lam_n = -torch.log(sigma), -torch.log(sigma_next)
        h = sigma_next - sigma if slip == "h in sigma" else lam_n - lam
        if slip == "h sign":
            lam, lam_n, h = -lam, -lam_n, -h
        D = x0
        if x0_prev is not None and slip != "first order":
            r = ((sigma - sigma_prev) if slip == "h in sigma" else (lam - lam_prev)) / h
            r = {"r inverted": 1 / r, "r missing": torch.tensor(1.0)}.get(slip, r)
            prev = {"prev eps": eps_prev}.get(slip, x0_prev)
            half = 1.0 if slip == "no half" else 0.5
            if slip == "swapped":
                D = x0_prev + half / r * (x0_prev - x0)
            elif slip == "eps correction":
                D = x0 + half / r * (eps - eps_prev)
            else:
                D = x0 + half / r * (x0 - prev)
        ratio = {"alpha ratio": a_n / a, "sigma ratio": sigma_next / sigma}.get(slip, s_n / s)
        coef = {"no alpha_next": 1.0, "noise coef": s_n}.get(slip, a_n)
        sign = 1.0 if slip == "plus D" else -1.0
        x = ratio * x + sign * coef * (torch.exp(-h) - 1) * D
        if slip in ("scaled input", "scaled input sqrt"):
            x = x * (sigma_next**2 + 1) ** 0.5 / (sigma**2 + 1) ** 0.5 if slip == "scaled input sqrt" else x * sigma_next / sigma
        if first_x0 is None:
            first_x0, first_lam = x0, lam
        stale = slip in ("stale memory", "stale x0", "stale lambda")
        x0_prev = first_x0 if stale and slip != "stale lambda" else x0
        lam_prev = first_lam if stale and slip != "stale x0" else lam
        eps_prev, sigma_prev = eps, sigma
    return x


def dpmpp_2m_diffusers_form(model, x_T, sigmas, timesteps):
    """Another correct form: diffusers' D0/D1 with lists, λ = log α_t - log σ_t, Python floats, expm1."""
    sigmas = sigmas.tolist()
    x, x0_preds, lambdas = x_T, [], []
    for i, t in enumerate(timesteps.tolist()):
        alpha_t, sigma_t = (sigmas[i] ** 2 + 1) ** -0.5, sigmas[i] * (sigmas[i] ** 2 + 1) ** -0.5
        x0_preds.append((x - sigma_t * model(x, torch.full((x.shape[0],), t))) / alpha_t)
        lambdas.append(math.log(alpha_t) - math.log(sigma_t))
        if sigmas[i + 1] == 0:
            break
        alpha_next, sigma_next = (sigmas[i + 1] ** 2 + 1) ** -0.5, sigmas[i + 1] * (sigmas[i + 1] ** 2 + 1) ** -0.5
        h = math.log(alpha_next) - math.log(sigma_next) - lambdas[-1]
        D0, D1 = x0_preds[-1], 0
        if len(x0_preds) > 1:
            r0 = (lambdas[-1] - lambdas[-2]) / h
            D1 = (x0_preds[-1] - x0_preds[-2]) / r0
        x = sigma_next / sigma_t * x - alpha_next * math.expm1(-h) * (D0 + 0.5 * D1)
    return x0_preds[-1]


@pytest.mark.parametrize("answer", [dpmpp_2m, dpmpp_2m_diffusers_form, exercises.reference_dpmpp_2m])
def test_dpmpp_2m_accepts_correct_forms(answer, capsys):
    assert exercises.check_dpmpp_2m(answer) is answer
    assert "✅ `dpmpp_2m` matches" in capsys.readouterr().out


def test_dpmpp_2m_stub_hands_back_the_library_sampler(capsys):
    reference = exercises.check_dpmpp_2m(stub)
    assert "not written yet" in capsys.readouterr().out
    schedule = NoiseSchedule()
    model = lambda x, t: 0.5 * x + 0.1 * torch.cos(torch.as_tensor(t).double() / 90).float().reshape(-1, 1)  # noqa: E731
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    timesteps = schedule.inference_timesteps(7, "trailing")
    ours = reference(model, x_T, samplers.inference_sigmas(schedule, timesteps), timesteps)
    library = samplers.sample(model, x_T, schedule, "dpmpp_2m", 7, timestep_spacing="trailing", progress=False)
    torch.testing.assert_close(ours, library)


DPM_SLIPS = {
    "scaled input": "works on the DDPM scale",
    "scaled input sqrt": "works on the DDPM scale",
    "wrong t": re.escape("evaluates it at timesteps[0]"),
    "heun-like": "evaluated twice",
    "x0 sigma-space": re.escape("σ-space's x̄ - σ ε̂ does not apply"),
    "x0 no sqrt": "step 0 .*enters through square roots",
    "h in sigma": "h must be λ_next - λ .*not σ_next - σ",
    "h sign": "the exponent has the wrong sign",
    "alpha ratio": "not by √ᾱ_next/√ᾱ",
    "sigma ratio": "not by σ-space's σ_next/σ",
    "no alpha_next": "the D term is scaled by √ᾱ_next",
    "noise coef": "the signal scale, not the noise scale",
    "plus D": "mind the minus sign",
    "first order": "step 1 .*your step matches DDIM's, first order",
    "r inverted": "you used its inverse",
    "no half": "the factor 1/2 is missing",
    "r missing": "r is missing",
    "prev eps": "you used the previous ε instead of the previous x0 prediction",
    "eps correction": "the correction uses the ε predictions",
    "swapped": "x0_pred and x0_pred_prev are swapped",
    "stale memory": "step 2 .*x0_pred_prev and λ_prev must be the previous step's",
    "stale x0": "step 2 .*x0_pred_prev must be the previous step's x0_pred",
    "stale lambda": "step 2 .*λ_prev must be the previous step's λ",
    "no last special case": "step 5 .*NaN or inf: the last step",
    "last returns x": "step 5 .*returned x unchanged",
    "skip last step": "the last step is missing",
}


@pytest.mark.parametrize("slip", DPM_SLIPS)
def test_dpmpp_2m_slips_are_named_at_the_first_step_that_diverges(slip):
    with pytest.raises(ExerciseError, match=DPM_SLIPS[slip]) as error:
        exercises.check_dpmpp_2m(lambda *args: dpmpp_2m(*args, slip=slip))
    assert str(error.value).startswith("`dpmpp_2m` on 6 'trailing' steps"), str(error.value)


def test_dpmpp_2m_other_failures_say_where():
    with pytest.raises(ExerciseError, match="returned None"):
        exercises.check_dpmpp_2m(lambda model, x_T, sigmas, timesteps: None)
    def fails_in_step_1(model, x_T, sigmas, timesteps):
        calls = []

        def counting(x, t):
            calls.append(t)
            if len(calls) == 2:
                raise ZeroDivisionError("division by zero")
            return model(x, t)
        return dpmpp_2m(counting, x_T, sigmas, timesteps)

    with pytest.raises(ExerciseError, match="raised ZeroDivisionError: division by zero\n  on 6 'trailing' steps.*after 1 of 6"):
        exercises.check_dpmpp_2m(fails_in_step_1)
    with pytest.raises(ExerciseError, match="shape"):
        exercises.check_dpmpp_2m(lambda model, x_T, sigmas, timesteps: exercises.reference_dpmpp_2m(
            model, x_T, sigmas, timesteps)[:1])
