"""The U-Net's and the VAE's building blocks: a ResNet block with a timestep input, and resampling.

Names and shapes follow diffusers (``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``), which
follow Stable Diffusion's original ``ResBlock`` / ``Downsample`` / ``Upsample``, so real SD
weights copy in by renaming keys only (``minisd.convert``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SD_UNET_NORM_EPS = 1e-5  # GroupNorm ε of SD's U-Net (diffusers' norm_eps default)
SD_VAE_NORM_EPS = 1e-6  # GroupNorm ε of SD's VAE
SD_NORM_GROUPS = 32  # GroupNorm groups in SD's U-Net and VAE (Wu & He 2018's default)


class ResnetBlock2D(nn.Module):
    """h = conv2(drop(SiLU(norm2(conv1(SiLU(norm1(x))) + proj(SiLU(temb)))))); out = shortcut(x) + h.

    Args:
        in_channels, out_channels: channels of x and of the output.
        temb_channels: width of the timestep embedding, or None for a block without one (the VAE).
        groups: GroupNorm groups; must divide in_channels and out_channels.
        eps: GroupNorm ε: 1e-5 in SD's U-Net, 1e-6 in its VAE.
        dropout: dropout before conv2 (SD: 0.0).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int = SD_NORM_GROUPS,
        eps: float = SD_UNET_NORM_EPS,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
            if channels % groups:
                raise ValueError(f"{name}={channels} is not divisible by groups={groups}; GroupNorm needs that.")
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = nn.SiLU()
        # a 1×1 conv matches the channels of the residual path when they change
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, in_channels, H, W); temb: (B, temb_channels) or None → (B, out_channels, H, W)."""
        h = self.conv1(self.nonlinearity(self.norm1(x)))  # (B, out, H, W)
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this block was built with temb_channels, so forward needs temb (B, temb_channels).")
            h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]  # one shift per channel
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Downsample2D(nn.Module):
    """Halve H and W with a 3×3 stride-2 convolution (learned, unlike pooling).

    ``padding=1`` pads all sides (SD's U-Net); ``padding=0`` pads only right and bottom by one
    pixel first (SD's VAE encoder), which gives the same output size with other weights' alignment.
    """

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"padding={padding!r}; use 1 (U-Net) or 0 (VAE: asymmetric right/bottom pad).")
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → (B, C, H/2, W/2)."""
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)


class Upsample2D(nn.Module):
    """Double H and W: nearest-neighbour ×2, then a 3×3 convolution to smooth the blocks."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
