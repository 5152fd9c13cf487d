"""The forward process: closed form q(x_t | x_0) against the iterated chain of eq. (2)."""

import pytest
import torch

from minisd.diffusion import forward_chain, q_mean_std, q_sample, q_step
from minisd.schedules import NoiseSchedule

SCHEDULES = [NoiseSchedule(), NoiseSchedule.stable_diffusion(), NoiseSchedule(beta_schedule="cosine")]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("t", [0, 40, 300, 999])
def test_closed_form_matches_the_chain_in_mean_and_variance(schedule, t):
    n = 20_000  # samples per pixel: the standard error of the mean is ≈ 0.7% of the noise std
    x0 = torch.linspace(-1, 1, 8).reshape(1, 1, 2, 4).expand(n, 1, 2, 4).contiguous()
    chain = forward_chain(schedule, x0, t, generator=torch.Generator().manual_seed(t))
    mean, std = q_mean_std(schedule, x0[:1], t)
    se_mean = std / n**0.5
    assert torch.all((chain.mean(0, keepdim=True) - mean).abs() < 5 * se_mean), "means differ by > 5 standard errors"
    var = std**2
    se_var = var * (2 / (n - 1)) ** 0.5
    assert torch.all((chain.var(0, keepdim=True) - var).abs() < 5 * se_var), "variances differ by > 5 standard errors"


def test_chain_of_one_step_is_q_step_and_matches_add_noise():
    schedule = NoiseSchedule()
    x0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    one_step = forward_chain(schedule, x0, 0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(one_step, q_step(x0, noise, schedule.betas[0]))
    # At t = 0 the chain and the closed form are the same formula: ᾱ_0 = α_0 = 1 - β_0.
    torch.testing.assert_close(one_step, schedule.add_noise(x0, noise, 0))


def test_q_step_closed_cases():
    x = torch.full((1, 1, 2, 2), 2.0)
    eps = torch.ones_like(x)
    torch.testing.assert_close(q_step(x, eps, 0.36), 0.8 * x + 0.6 * eps)
    torch.testing.assert_close(q_step(x, eps, 1.0), eps)  # β = 1 forgets x entirely


def test_forward_chain_return_all_and_q_sample_shapes():
    schedule = NoiseSchedule()
    x0 = torch.zeros(2, 3, 4, 4)
    states = forward_chain(schedule, x0, 9, generator=torch.Generator().manual_seed(0), return_all=True)
    assert states.shape == (11, 2, 3, 4, 4)
    assert torch.equal(states[0], x0)
    x_t, noise = q_sample(schedule, x0, torch.tensor([5, 900]), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_t, schedule.add_noise(x0, noise, torch.tensor([5, 900])))


def test_errors_name_the_argument():
    schedule = NoiseSchedule(num_train_timesteps=10)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 9\]"):
        forward_chain(schedule, torch.zeros(1, 1, 2, 2), 10)
    with pytest.raises(ValueError, match="noise must have the shape of x_prev"):
        q_step(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3), 0.1)
