"""The spatial transformer: how text enters Stable Diffusion's U-Net (Rombach et al. 2022, section 3.3).

At each attention level the feature map (B, C, H, W) becomes H·W tokens of width C, and each token
goes through ``BasicTransformerBlock``s (pre-norm, residual around each part, Vaswani et al. 2017):

    h = h + attn1(norm1(h))                          self-attention: pixels look at pixels
    h = h + attn2(norm2(h), encoder_hidden_states)   cross-attention: pixels look at the text tokens
    h = h + ff(norm3(h))                             feed-forward with GEGLU (Shazeer 2020)

``Transformer2DModel`` wraps them: GroupNorm, ``proj_in`` to tokens, the blocks, ``proj_out`` back
to a feature map, plus a residual. ``proj_in``/``proj_out`` are 1×1 convolutions in SD v1 and
Linear layers in SD 2.x (``use_linear_projection``): the same maps, different weight shapes.
This is CompVis' ``SpatialTransformer``; the names are diffusers'.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .attention import Attention
from .resnet import SD_NORM_GROUPS

FF_MULT = 4  # feed-forward inner width = 4 × C, as in the Transformer and SD
TRANSFORMER_NORM_EPS = 1e-6  # the spatial transformer's GroupNorm ε in SD (its ResNet blocks use 1e-5)
LAYER_NORM_EPS = 1e-5  # the transformer blocks' LayerNorm ε (PyTorch's default, as SD)


class GEGLU(nn.Module):
    """GEGLU(x) = (x W + b) ⊙ GELU(x V + c) (Shazeer 2020, eq. 5): one Linear makes both halves.

    x: (…, dim_in) → (…, dim_out). Key ``proj`` holds [W; V], (2·dim_out, dim_in), as diffusers.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)  # (…, dim_out) each
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to FF_MULT·C, then back to C; keys ``net.0.proj`` and ``net.2`` as diffusers (net.1: dropout)."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = FF_MULT * dim
        self.net = nn.ModuleList([GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) → (B, N, C)."""
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; each pre-normed with a residual.

    Args:
        dim: C, width of the image tokens.
        num_attention_heads: h; dim_head = C / h channels per head.
        cross_attention_dim: width of the text states (SD v1: 768, SD 2.x: 1024, the course: 384).
        dropout: dropout in attention outputs and the feed-forward (SD: 0.0).
    """

    def __init__(self, dim: int, num_attention_heads: int, cross_attention_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_attention_heads:
            raise ValueError(f"dim={dim} is not divisible by num_attention_heads={num_attention_heads}.")
        dim_head = dim // num_attention_heads
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn1 = Attention(dim, None, num_attention_heads, dim_head, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn2 = Attention(dim, cross_attention_dim, num_attention_heads, dim_head, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(dim, dropout)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, N, C) image tokens; encoder_hidden_states: (B, L, cross_attention_dim) → (B, N, C)."""
        h = hidden_states + self.attn1(self.norm1(hidden_states))
        h = h + self.attn2(self.norm2(h), encoder_hidden_states)
        return h + self.ff(self.norm3(h))


def _projection(channels: int, linear: bool) -> nn.Module:
    """C → C per token: a Linear on (B, N, C) tokens (SD 2.x) or a 1×1 conv on (B, C, H, W) maps (SD v1)."""
    return nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, kernel_size=1)


class Transformer2DModel(nn.Module):
    """GroupNorm → proj_in → BasicTransformerBlocks over the H·W tokens → proj_out, plus a residual.

    Args:
        in_channels: C of the feature map.
        num_attention_heads: h per block (C / h channels per head).
        cross_attention_dim: width of ``encoder_hidden_states``.
        num_layers: transformer blocks in sequence (SD v1/2: 1; diffusers' transformer_layers_per_block).
        norm_num_groups: GroupNorm groups (SD: 32); must divide C.
        use_linear_projection: proj_in/proj_out as Linear (SD 2.x) instead of 1×1 conv (SD v1).
        dropout: see ``BasicTransformerBlock``.
    """

    def __init__(self, in_channels: int, num_attention_heads: int, cross_attention_dim: int, num_layers: int = 1,
                 norm_num_groups: int = SD_NORM_GROUPS, use_linear_projection: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if in_channels % norm_num_groups:
            raise ValueError(f"in_channels={in_channels} is not divisible by norm_num_groups={norm_num_groups}.")
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = _projection(in_channels, use_linear_projection)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(in_channels, num_attention_heads, cross_attention_dim, dropout) for _ in range(num_layers)]
        )
        self.proj_out = _projection(in_channels, use_linear_projection)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, C, H, W); encoder_hidden_states: (B, L, cross_attention_dim) → (B, C, H, W)."""
        B, C, H, W = hidden_states.shape
        h = self.norm(hidden_states)
        if not self.use_linear_projection:
            h = self.proj_in(h)  # 1×1 conv, (B, C, H, W)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # tokens, (B, N, C)
        if self.use_linear_projection:
            h = self.proj_in(h)  # (B, N, C)
        for block in self.transformer_blocks:
            h = block(h, encoder_hidden_states)  # (B, N, C)
        if self.use_linear_projection:
            h = self.proj_out(h)  # (B, N, C)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.use_linear_projection:
            h = self.proj_out(h.contiguous())  # 1×1 conv, (B, C, H, W)
        return hidden_states + h
