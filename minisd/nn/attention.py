"""Attention layers: every pixel looks at every other pixel (Vaswani et al. 2017, eq. 1).

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V,   d = channels per head

``SelfAttention2d`` is the attention of diffusers' ``UNet2DModel`` and of SD's VAE mid-block:
GroupNorm, then queries, keys and values all from the image itself, plus a residual. Its
parameter names (``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``) are diffusers'.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .resnet import SD_NORM_GROUPS, SD_UNET_NORM_EPS


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H·W pixels of a feature map, with a residual.

    Give either ``num_heads`` (SD v1's U-Net: 8 at every level) or ``head_dim`` (diffusers'
    ``UNet2DModel``: channels per head, its ``attention_head_dim``); neither means one head
    (SD's VAE).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int | None = None,
        head_dim: int | None = None,
        groups: int = SD_NORM_GROUPS,
        eps: float = SD_UNET_NORM_EPS,
    ) -> None:
        super().__init__()
        if num_heads is not None and head_dim is not None:
            raise ValueError(f"give num_heads or head_dim, not both (got {num_heads} and {head_dim}).")
        if head_dim is not None:
            if channels % head_dim:
                raise ValueError(f"channels={channels} is not divisible by head_dim={head_dim}.")
            num_heads = channels // head_dim
        num_heads = num_heads or 1
        if channels % num_heads:
            raise ValueError(f"channels={channels} is not divisible by num_heads={num_heads}.")
        if channels % groups:
            raise ValueError(f"channels={channels} is not divisible by groups={groups}; GroupNorm needs that.")
        self.num_heads = num_heads
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # a list so that keys read to_out.0.weight, as in diffusers (index 1 is dropout there)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → (B, C, H, W)."""
        B, C, H, W = x.shape
        N, h = H * W, self.num_heads  # tokens (pixels), heads
        tokens = self.group_norm(x).reshape(B, C, N).transpose(1, 2)  # (B, N, C)

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, N, h, C // h).transpose(1, 2)  # (B, h, N, C/h)

        q, k, v = split_heads(self.to_q(tokens)), split_heads(self.to_k(tokens)), split_heads(self.to_v(tokens))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ/√d) v, (B, h, N, C/h)
        out = out.transpose(1, 2).reshape(B, N, C)  # heads back together, (B, N, C)
        out = self.to_out[1](self.to_out[0](out))  # (B, N, C)
        out = out.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + out


# ----------------------------------------------------------------------------- lesson 08
# SpatialTransformer (cross-attention to the text: Q from latents, K and V from
# encoder_hidden_states, then a GEGLU feed-forward) goes here, built in lesson 08 and used by the
# U-Net's levels when UNetConfig.cross_attention_dim is set.
