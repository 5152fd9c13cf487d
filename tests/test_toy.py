"""minisd.toy: the 2-D Gaussian-mixture data, its exact ε*, the toy MLP and the point-set metrics."""

import functools
import math

import pytest
import torch

from minisd import samplers, toy
from minisd.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = NoiseSchedule()


def test_ring_has_the_stated_modes_and_the_samples_are_seeded():
    mixture = toy.ring(num_modes=8, radius=2.0, std=0.1)
    assert mixture.means.shape == (8, 2)
    torch.testing.assert_close(mixture.means.norm(dim=1), torch.full((8,), 2.0))
    angles = torch.atan2(mixture.means[:, 1], mixture.means[:, 0]).remainder(2 * math.pi).sort().values
    torch.testing.assert_close(angles.diff(), torch.full((7,), 2 * math.pi / 8))  # evenly spaced
    a = mixture.sample(4000, torch.Generator().manual_seed(0))
    b = mixture.sample(4000, torch.Generator().manual_seed(0))
    assert a.shape == (4000, 2) and torch.equal(a, b)
    assert not torch.equal(a, mixture.sample(4000, torch.Generator().manual_seed(1)))
    nearest = torch.cdist(a, mixture.means).argmin(dim=1)
    counts = torch.bincount(nearest, minlength=8).float()
    assert (counts / 4000 - 1 / 8).abs().max() < 0.03  # equal weights
    spread = (a - mixture.means[nearest]).std(dim=0)
    torch.testing.assert_close(spread, torch.full((2,), 0.1), atol=0.01, rtol=0)  # per-mode std s
    # a 2-D Gaussian keeps 1 - exp(-9/2) = 98.9 % of its mass within 3 s
    assert toy.share_near_modes(a, mixture) == pytest.approx(1 - math.exp(-4.5), abs=0.01)


def test_spiral_modes_lie_on_an_archimedean_spiral():
    mixture = toy.spiral(num_modes=24, turns=1.5, radius=2.0)
    radii = mixture.means.norm(dim=1)
    assert mixture.means.shape == (24, 2)
    assert radii[0].item() == pytest.approx(0.5) and radii[-1].item() == pytest.approx(2.0)
    assert (radii.diff() > 0).all()  # r grows with the angle
    torch.testing.assert_close(mixture.weights.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("mixture", [toy.ring(), toy.spiral()], ids=["ring", "spiral"])
@pytest.mark.parametrize("t", [0, 10, 250, 600, 999])
def test_exact_eps_is_the_scaled_score_of_the_noised_mixture(mixture, t):
    # ε* = -√(1 - ᾱ_t) ∇ log q(x_t): autograd of the closed-form log-density
    x_t = (1.5 * torch.randn(64, 2, generator=torch.Generator().manual_seed(t), dtype=torch.float64)).requires_grad_()
    alpha_bar = SCHEDULE.alphas_cumprod[t].double()
    (grad,) = torch.autograd.grad(mixture.noisy_log_prob(x_t, alpha_bar).sum(), x_t)
    expected = -(1 - alpha_bar).sqrt() * grad
    torch.testing.assert_close(toy.exact_eps(x_t.detach(), t, mixture, SCHEDULE), expected, atol=1e-9, rtol=1e-7)


def test_noisy_log_prob_is_a_density_and_at_t0_the_data_density():
    mixture = toy.ring(num_modes=3, radius=1.0, std=0.3)
    side = torch.linspace(-4, 4, 401, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2)
    for alpha_bar in (1.0, 0.5, 0.01):
        mass = mixture.noisy_log_prob(grid, alpha_bar).exp().sum() * (side[1] - side[0]) ** 2
        assert mass.item() == pytest.approx(1.0, abs=2e-3)


def test_posterior_mean_matches_a_monte_carlo_posterior():
    # E[x_0 | x_t] by importance weighting samples of the prior with the Gaussian likelihood q(x_t | x_0)
    mixture, t = toy.ring(), 300
    alpha_bar = SCHEDULE.alphas_cumprod[t].double()
    x0 = mixture.sample(200_000, torch.Generator().manual_seed(3)).double()
    x_t = torch.tensor([[0.9, 0.4], [-0.2, -1.1], [0.0, 0.0]], dtype=torch.float64)
    log_w = -((x_t[:, None] - alpha_bar.sqrt() * x0[None]) ** 2).sum(-1) / (2 * (1 - alpha_bar))  # (3, M)
    monte_carlo = log_w.softmax(dim=1) @ x0
    torch.testing.assert_close(mixture.posterior_mean(x_t, alpha_bar), monte_carlo, atol=0.02, rtol=0)


def test_exact_eps_takes_one_timestep_per_point_and_float32():
    mixture = toy.ring()
    x_t = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 10, 500, 998, 999])
    together = toy.exact_eps(x_t, t, mixture, SCHEDULE)
    one_by_one = torch.cat([toy.exact_eps(x_t[i:i + 1], int(t[i]), mixture, SCHEDULE) for i in range(5)])
    assert together.dtype == torch.float32 and torch.isfinite(together).all()
    torch.testing.assert_close(together, one_by_one)


def test_the_mlp_learns_a_few_hundred_steps_bring_its_loss_near_the_floor():
    mixture = toy.ring()
    torch.manual_seed(0)
    model = toy.ToyEpsModel()
    g = torch.Generator().manual_seed(9)  # a held-out batch
    x0, t, eps = mixture.sample(4096, g), torch.randint(0, 1000, (4096,), generator=g), torch.randn(4096, 2, generator=g)
    x_t = SCHEDULE.add_noise(x0, eps, t)

    def loss(m):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(m(x_t, t), eps).item()

    before = loss(model)
    history = toy.train_toy_model(model, mixture, SCHEDULE, num_steps=300, batch_size=256, progress=False)
    floor = loss(functools.partial(toy.exact_eps, mixture=mixture, schedule=SCHEDULE))
    assert len(history) == 300 and before > 0.9  # an untrained net is no better than predicting 0 (loss ≈ 1)
    assert loss(model) < 0.30  # measured 0.247-0.252 over seeds 0-2; the floor is 0.203, the untrained net 1.02
    assert floor < loss(model)  # the exact ε* is the floor
    # the same seed gives the same model
    torch.manual_seed(0)
    again = toy.ToyEpsModel()
    toy.train_toy_model(again, mixture, SCHEDULE, num_steps=5, batch_size=256, progress=False)
    torch.manual_seed(0)
    twice = toy.ToyEpsModel()
    toy.train_toy_model(twice, mixture, SCHEDULE, num_steps=5, batch_size=256, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), twice.parameters()))


def test_ddim_with_the_exact_eps_lands_on_the_modes():
    mixture = toy.ring()
    exact = functools.partial(toy.exact_eps, mixture=mixture, schedule=SCHEDULE)
    x_T = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    x0 = samplers.sample(exact, x_T, SCHEDULE, "ddim", 50, timestep_spacing="trailing", progress=False)
    assert toy.share_near_modes(x0, mixture) > 0.95
    modes = torch.cdist(x0, mixture.means).argmin(dim=1)
    assert torch.bincount(modes, minlength=8).min() > 1000 / 8 * 0.6  # every mode is reached, none is dropped
    assert toy.share_near_modes(x_T, mixture) < 0.1  # the noise itself is not near the modes


def test_energy_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    a = toy.ring().sample(500, torch.Generator().manual_seed(0))
    b = toy.ring().sample(500, torch.Generator().manual_seed(1))
    assert toy.energy_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    same = toy.energy_distance(a, b)
    assert 0 < same < 0.02
    assert toy.energy_distance(a, b + 0.5) > 10 * same
    assert toy.energy_distance(a, b) == pytest.approx(toy.energy_distance(b, a))


def test_bad_input_is_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="num_modes"):
        toy.ring(num_modes=0)
    with pytest.raises(ValueError, match="means must be"):
        toy.GaussianMixture(torch.zeros(3, 3), 0.1, torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="weights must be"):
        toy.GaussianMixture(torch.zeros(3, 2), 0.1, torch.ones(3))
    with pytest.raises(ValueError, match="std must be"):
        toy.GaussianMixture(torch.zeros(3, 2), 0.0, torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="n must be"):
        toy.ring().sample(0)
    with pytest.raises(ValueError, match=r"x_t must be points in the plane"):
        toy.exact_eps(torch.zeros(4, 3), 10, toy.ring(), SCHEDULE)
    with pytest.raises(ValueError, match="t must lie in"):
        toy.exact_eps(torch.zeros(4, 2), 1000, toy.ring(), SCHEDULE)
    with pytest.raises(ValueError, match="num_steps"):
        toy.train_toy_model(toy.ToyEpsModel(), toy.ring(), SCHEDULE, num_steps=0)


def test_min_snr_weighting_scales_each_samples_error_by_min_snr_gamma_over_snr():
    """Min-SNR-γ (Hang et al. 2023): the first step's loss is the per-sample squared error weighted by
    min(SNR_t, γ) / SNR_t; a γ above every SNR gives the plain loss; γ must be positive."""
    schedule = NoiseSchedule.stable_diffusion()
    mixture = toy.ring()

    class Zero(torch.nn.Module):  # predicts ε̂ = 0: the error is ε², known from the seed's draws
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x_t, t):
            return self.w * x_t

    g = torch.Generator().manual_seed(3)
    mixture.sample(64, g)
    t = torch.randint(0, 1000, (64,), generator=g)
    noise = torch.randn(64, 2, generator=g)
    snr = schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])
    weighted = toy.train_toy_model(Zero(), mixture, schedule, num_steps=1, batch_size=64, seed=3, progress=False,
                                   snr_gamma=5.0)[0]
    expected = (noise.square().mean(1) * snr.clamp(max=5.0) / snr).mean().item()
    assert weighted == pytest.approx(expected, rel=1e-5)
    plain = toy.train_toy_model(Zero(), mixture, schedule, num_steps=1, batch_size=64, seed=3, progress=False)[0]
    huge = toy.train_toy_model(Zero(), mixture, schedule, num_steps=1, batch_size=64, seed=3, progress=False,
                               snr_gamma=1e9)[0]
    assert huge == pytest.approx(plain, rel=1e-6) and weighted < plain
    with pytest.raises(ValueError, match="snr_gamma must be > 0"):
        toy.train_toy_model(Zero(), mixture, schedule, num_steps=1, snr_gamma=0.0)
