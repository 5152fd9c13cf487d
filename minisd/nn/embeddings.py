"""Telling the network *when* it is: sinusoidal timestep embeddings and their MLP.

The U-Net sees x_t but must also know t, since the noise level decides how much to remove. Like
the Transformer's positions (Vaswani et al. 2017, section 3.5), t becomes a vector of sines and
cosines at geometrically spaced frequencies,

    ω_i = max_period^(-i / (half - shift)),  i = 0 … half-1,   emb(t) = [cos(t ω), sin(t ω)]

(half = dim // 2; cosines first when ``flip_sin_to_cos``, as Stable Diffusion and DDPM's code
do), then a small MLP (``TimestepEmbedding``) maps it to the width the ResNet blocks use:
4 × block_out_channels[0] in Stable Diffusion (320 → 1280).
"""

from __future__ import annotations

import math

import torch
from torch import nn

SD_MAX_PERIOD = 10_000  # slowest wavelength, as in the Transformer and in Stable Diffusion
TIME_EMBED_MULT = 4  # SD: time_embed_dim = 4 × block_out_channels[0] (320 → 1280)


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0,
    max_period: int = SD_MAX_PERIOD,
) -> torch.Tensor:
    """Sinusoidal embedding of each timestep (module docstring), SD's convention by default.

    Equals diffusers' ``get_timestep_embedding`` with the same arguments.

    Args:
        timesteps: t, (B,) integers or floats (one per batch item).
        dim: width of the embedding; an odd ``dim`` gets one zero column at the end.
    Returns:
        (B, dim) float32, values in [-1, 1].
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, one per batch item (B,); got shape {tuple(timesteps.shape)}.")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half - downscale_freq_shift))  # ω_i, (half,)
    angles = timesteps[:, None].float() * frequencies[None, :]  # t ω, (B, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (B, 2·half)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)  # cosines first, (B, 2·half)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))  # (B, dim)
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 → SiLU → linear_2 (diffusers' names and shapes).

    Each ResNet block then applies its own SiLU + ``time_emb_proj`` to the output.
    """

    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """sample: sinusoidal embedding, (B, in_channels) → (B, time_embed_dim)."""
        return self.linear_2(self.act(self.linear_1(sample)))
