"""Diffusion in two dimensions: data you can plot, and a denoiser you know exactly.

Images have thousands of dimensions; points in the plane have two, so every x_t, every ε̂ and
every sampler's path can be drawn. The data are a **mixture of Gaussians** (a ring of modes, or
modes along a spiral), p(x_0) = Σ_k w_k N(x_0; μ_k, s² I), and for such data the forward process
stays a mixture, with every component noised by the same closed form (DDPM eq. 4):

    q(x_t) = Σ_k w_k N(x_t; √ᾱ_t μ_k, v_t I),   v_t = ᾱ_t s² + (1 - ᾱ_t)

So the best possible noise prediction is known in closed form. With γ_k(x_t) the posterior
probability of component k given x_t (softmax of the log-densities above), the posterior mean and ε* are

    E[x_0 | x_t] = Σ_k γ_k (μ_k + √ᾱ_t s² / v_t · (x_t - √ᾱ_t μ_k))
    ε*(x_t, t)  = (x_t - √ᾱ_t E[x_0 | x_t]) / √(1 - ᾱ_t)  = -√(1 - ᾱ_t) ∇ log q(x_t)

the minimiser of DDPM's loss (Ho et al. 2020, eq. 14): the score ∇ log q(x_t) of Song et al. (2021)
times -√(1 - ᾱ_t) (Tweedie's formula, Efron 2011). ``exact_eps`` computes it; ``ToyEpsModel`` is a small MLP that
learns it in seconds (``train_toy_model``), so a lesson can put the learned field beside the true one.
Points are (N, 2) tensors on the DDPM scale, the shape ``samplers.sample`` accepts as (B, …).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .diffusion import ddpm_loss
from .nn.embeddings import timestep_embedding
from .schedules import NoiseSchedule

TIME_EMBED_DIM = 32  # sinusoidal features of t; enough to tell 1000 timesteps apart on a 2-D toy


@dataclass(frozen=True)
class GaussianMixture:
    """p(x_0) = Σ_k w_k N(x_0; μ_k, s² I) in the plane.

    Attributes:
        means: μ_k, (K, 2). std: s > 0, the same for every mode. weights: w_k, (K,), summing to 1.
    """

    means: torch.Tensor
    std: float
    weights: torch.Tensor

    def __post_init__(self) -> None:
        K = self.means.shape[0] if self.means.ndim == 2 else -1
        if self.means.ndim != 2 or self.means.shape[1] != 2:
            raise ValueError(f"means must be (K, 2), one point in the plane per mode; got shape {tuple(self.means.shape)}.")
        if self.weights.shape != (K,) or (self.weights < 0).any() or abs(self.weights.sum().item() - 1) > 1e-5:
            raise ValueError(f"weights must be (K,) = ({K},), non-negative, summing to 1; got {self.weights.tolist()}.")
        if not self.std > 0:
            raise ValueError(f"std must be > 0 (the modes' standard deviation s), got {self.std!r}.")

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n points x_0 ~ p(x_0), (n, 2): a mode k ~ w, then μ_k + s z."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int ≥ 1, got {n!r}.")
        modes = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        return self.means[modes] + self.std * torch.randn(n, 2, generator=generator)

    def noisy_log_prob(self, x_t: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """log q(x_t) = log Σ_k w_k N(x_t; √ᾱ μ_k, v I) (module docstring); x_t (N, 2), ᾱ a scalar or (N, 1) -> (N,)."""
        return torch.logsumexp(self._component_log_probs(x_t, alpha_bar), dim=-1)

    def mode_posterior(self, x_t: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """γ_k(x_t) = P(mode k | x_t), (N, K): which mode x_t will be denoised towards, and how surely."""
        return self._component_log_probs(x_t, alpha_bar).softmax(dim=-1)

    def posterior_mean(self, x_t: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """E[x_0 | x_t] (Tweedie's formula, module docstring); x_t (N, 2), ᾱ a scalar or (N, 1) -> (N, 2)."""
        alpha_bar = torch.as_tensor(alpha_bar, dtype=x_t.dtype)
        sqrt_alpha_bar, variance = alpha_bar.sqrt(), alpha_bar * self.std**2 + (1 - alpha_bar)  # √ᾱ, v
        gamma = self.mode_posterior(x_t, alpha_bar)  # γ_k(x_t), (N, K)
        means = self.means.to(x_t.dtype)  # (K, 2)
        # per mode: μ_k + √ᾱ s² / v (x_t - √ᾱ μ_k) = μ_k (1 - ᾱ s² / v) + √ᾱ s² / v · x_t
        shrink = sqrt_alpha_bar * self.std**2 / variance  # scalar or (N, 1)
        return gamma @ means * (1 - shrink * sqrt_alpha_bar) + shrink * x_t

    def _component_log_probs(self, x_t: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """log w_k + log N(x_t; √ᾱ μ_k, v I) for every mode, (N, K)."""
        if x_t.ndim != 2 or x_t.shape[1] != 2:
            raise ValueError(f"x_t must be points in the plane, (N, 2); got shape {tuple(x_t.shape)}.")
        alpha_bar = torch.as_tensor(alpha_bar, dtype=x_t.dtype)
        variance = alpha_bar * self.std**2 + (1 - alpha_bar)  # v, scalar or (N, 1)
        squared = (x_t[:, None, :] - alpha_bar.sqrt()[..., None] * self.means.to(x_t.dtype)).pow(2).sum(-1)  # (N, K)
        return self.weights.to(x_t.dtype).log() - squared / (2 * variance) - torch.log(2 * math.pi * variance)


def ring(num_modes: int = 8, radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """``num_modes`` equal modes evenly spaced on a circle of ``radius`` (the classic GAN toy)."""
    if isinstance(num_modes, bool) or not isinstance(num_modes, int) or num_modes < 1:
        raise ValueError(f"num_modes must be an int ≥ 1, got {num_modes!r}.")
    angles = 2 * math.pi * torch.arange(num_modes) / num_modes
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)  # (K, 2)
    return GaussianMixture(means, std, torch.full((num_modes,), 1 / num_modes))


def spiral(num_modes: int = 24, turns: float = 1.5, radius: float = 2.0, std: float = 0.08) -> GaussianMixture:
    """``num_modes`` equal modes along an Archimedean spiral r ∝ θ, from r = radius / 4 out to ``radius``."""
    if isinstance(num_modes, bool) or not isinstance(num_modes, int) or num_modes < 2:
        raise ValueError(f"num_modes must be an int ≥ 2, got {num_modes!r}.")
    fraction = torch.linspace(0.25, 1.0, num_modes)
    angles = 2 * math.pi * turns * fraction
    means = radius * fraction[:, None] * torch.stack([angles.cos(), angles.sin()], dim=1)  # (K, 2)
    return GaussianMixture(means, std, torch.full((num_modes,), 1 / num_modes))


def _alpha_bar_at(schedule: NoiseSchedule, t: int | torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t as a scalar (one t) or (N, 1) (one per point), in x_t's dtype."""
    t = schedule.check_timesteps(t)
    alpha_bar = schedule.alphas_cumprod[t].to(x_t.dtype)
    return alpha_bar[:, None] if alpha_bar.ndim == 1 else alpha_bar


def exact_eps(x_t: torch.Tensor, t: int | torch.Tensor, mixture: GaussianMixture, schedule: NoiseSchedule) -> torch.Tensor:
    """ε*(x_t, t) = (x_t - √ᾱ_t E[x_0 | x_t]) / √(1 - ᾱ_t): the optimal ε-prediction (module docstring).

    Args:
        x_t: points on the DDPM scale, (N, 2). t: an int or a (N,) tensor of timesteps in [0, T-1].
    Returns:
        ε*, (N, 2). ``functools.partial(exact_eps, mixture=…, schedule=…)`` is a model for ``samplers.sample``.
    """
    alpha_bar = _alpha_bar_at(schedule, t, x_t)
    return (x_t - alpha_bar.sqrt() * mixture.posterior_mean(x_t, alpha_bar)) / (1 - alpha_bar).sqrt()


class ToyEpsModel(nn.Module):
    """ε_θ(x_t, t) for points: an MLP on [x_t, sinusoidal embedding of t] (the U-Net's time embedding, lesson 03).

    Args:
        hidden: width of the hidden layers. num_layers: number of hidden layers (SiLU after each).
    """

    def __init__(self, hidden: int = 128, num_layers: int = 3) -> None:
        super().__init__()
        widths = [2 + TIME_EMBED_DIM] + [hidden] * num_layers
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 2))

    def forward(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x_t: (N, 2) on the DDPM scale; t: an int or a (N,) tensor -> ε̂, (N, 2)."""
        N = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(N) if t.ndim == 0 else t  # (N,)
        emb = timestep_embedding(t, TIME_EMBED_DIM).to(x_t.dtype)  # (N, TIME_EMBED_DIM)
        return self.net(torch.cat([x_t, emb], dim=1))


def train_toy_model(
    model: nn.Module, mixture: GaussianMixture, schedule: NoiseSchedule, num_steps: int = 2000,
    batch_size: int = 512, learning_rate: float = 1e-2, seed: int = 0, progress: bool = True,
    snr_gamma: float | None = None,
) -> list[float]:
    """Train ``model`` with DDPM's simple loss (Ho et al. 2020, eq. 14; ``diffusion.ddpm_loss``) on fresh samples of ``mixture``.

    Adam at ``learning_rate``, cosine-decayed to 0 over ``num_steps``; t uniform in [0, T-1].
    ``snr_gamma`` = γ weighs each sample's squared error by min(SNR_t, γ) / SNR_t, Min-SNR-γ for an
    ε-model (Hang et al. 2023, §3.4; diffusers' ``--snr_gamma``, γ = 5 suggested): the low-noise
    timesteps, whose ε is hard to read and matters little, count less. Returns the (weighted) loss of
    every step. The same seed gives the same model.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int ≥ 1, got {num_steps!r}.")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=num_steps)
    device = next(model.parameters()).device
    history = []
    model.train()
    for _ in tqdm(range(num_steps), desc="toy model", disable=not progress):
        x0 = mixture.sample(batch_size, generator)  # (B, 2)
        loss = ddpm_loss(model, schedule, x0.to(device), generator, snr_gamma=snr_gamma)  # draws t, then ε
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        history.append(loss.item())
    model.eval()
    return history


# --- How close a set of points is to the data -----------------------------------------------------


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E‖X - Y‖ - E‖X - X'‖ - E‖Y - Y'‖ between two point sets (Székely & Rizzo 2013).

    Zero only for equal distributions; a V-statistic (pairs of a point with itself included), so two
    finite samples of the same distribution give a small positive number. x: (N, 2), y: (M, 2).
    """
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def share_near_modes(x: torch.Tensor, mixture: GaussianMixture, num_std: float = 3.0) -> float:
    """Fraction of the points within ``num_std`` · s of some mode's centre μ_k. x: (N, 2).

    For the data themselves it is 1 - exp(-num_std² / 2) (a 2-D Gaussian's radius is Rayleigh): 98.9 % at 3.
    """
    nearest = torch.cdist(x.double(), mixture.means.double()).min(dim=1).values  # (N,)
    return (nearest <= num_std * mixture.std).double().mean().item()
