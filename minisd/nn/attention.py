"""Attention: every query token looks at every key token (Vaswani et al. 2017, eq. 1).

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V,   d = channels per head (``dim_head``)

One class, ``Attention``, does both kinds the U-Net needs:

- **self-attention**: Q, K and V all come from the image tokens (B, N, C), N = H·W pixels;
- **cross-attention** (Rombach et al. 2022, eq. 3): Q from the image tokens, K and V from the
  text encoder's per-token states ``encoder_hidden_states`` (B, L, cross_attention_dim), so that
  each pixel gathers what the words say. Its probabilities softmax(Q Kᵀ/√d), (B, heads, N, L), are
  the per-token attention maps of lesson 08: ``AttentionStore`` records them.

``SelfAttention2d`` wraps it for feature maps (GroupNorm, attention over the H·W pixels,
residual), as in diffusers' ``UNet2DModel`` and SD's VAE mid-block. Parameter names are
diffusers' (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``group_norm``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .resnet import SD_NORM_GROUPS, SD_UNET_NORM_EPS


class Attention(nn.Module):
    """Multi-head attention (module docstring); diffusers' ``Attention`` with its key names.

    Args:
        query_dim: C, channels of the query tokens (and of the output).
        cross_attention_dim: width of ``encoder_hidden_states`` for cross-attention; None for
            self-attention (K and V then come from the query tokens).
        heads: number of heads h.
        dim_head: d, channels per head; the inner width is h·d (SD: h·d = C).
        bias: biases on to_q, to_k, to_v (SD's transformer blocks: False; UNet2DModel and VAE: True).
        out_bias: bias on the output projection to_out.0 (always True in SD).
        dropout: dropout after the output projection (SD: 0.0).
    """

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 bias: bool = False, out_bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("query_dim", query_dim), ("heads", heads), ("dim_head", dim_head)):
            if value < 1:
                raise ValueError(f"{name}={value} must be ≥ 1.")
        if cross_attention_dim is not None and cross_attention_dim < 1:
            raise ValueError(f"cross_attention_dim={cross_attention_dim} must be ≥ 1, or None for self-attention.")
        inner_dim = heads * dim_head
        self.heads, self.dim_head, self.cross_attention_dim = heads, dim_head, cross_attention_dim
        kv_dim = query_dim if cross_attention_dim is None else cross_attention_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner_dim, bias=bias)
        # a list so that keys read to_out.0.weight, as in diffusers (index 1 is dropout there)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])
        self.captured: list[torch.Tensor] | None = None  # set by AttentionStore: where to put the probabilities

    @property
    def is_cross_attention(self) -> bool:
        return self.cross_attention_dim is not None

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: (B, N, C) query tokens; encoder_hidden_states: (B, L, cross_attention_dim) for
        cross-attention, None for self-attention (L = N) → (B, N, C)."""
        if self.is_cross_attention != (encoder_hidden_states is not None):
            raise ValueError(
                "encoder_hidden_states must be given to cross-attention (cross_attention_dim="
                f"{self.cross_attention_dim}) and only to it; got {'None' if encoder_hidden_states is None else 'a tensor'}."
            )
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        B, N, _ = hidden_states.shape
        L, h, d = context.shape[1], self.heads, self.dim_head

        q = self.to_q(hidden_states).reshape(B, N, h, d).transpose(1, 2)  # (B, h, N, d)
        k = self.to_k(context).reshape(B, L, h, d).transpose(1, 2)  # (B, h, L, d)
        v = self.to_v(context).reshape(B, L, h, d).transpose(1, 2)  # (B, h, L, d)
        if self.captured is not None:
            self.captured.append(attention_probs(q, k))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ/√d) v, (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, h * d)  # heads side by side, (B, N, h·d)
        return self.to_out[1](self.to_out[0](out))  # (B, N, C)


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) written out, in float32: q (B, h, N, d), k (B, h, L, d) → (B, h, N, L), rows sum to 1.

    The layers compute their output with ``F.scaled_dot_product_attention`` (fused, never forms
    this matrix); this explicit copy is only for looking at, so capturing never changes a result.
    """
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, N, L)
    return scores.softmax(dim=-1).detach()


class AttentionStore:
    """Records the attention probabilities of a model's ``Attention`` layers while in a ``with`` block.

        with AttentionStore(unet) as store:
            unet(latents, t, encoder_hidden_states=text_states)
        maps = store.token_maps(8, 8)  # (B, L, 8, 8): where each text token looked

    Args:
        model: any module; its ``Attention`` layers are found by name (``down_blocks.0.attentions.0.
            transformer_blocks.0.attn2`` …).
        cross_attention_only: True (default) records only the cross-attention layers (attn2), whose
            maps say which pixels attend to which text token; False records self-attention too.
    Attributes:
        maps: {layer name: [probabilities (B, heads, N, L), one per forward call]}.
    """

    def __init__(self, model: nn.Module, cross_attention_only: bool = True) -> None:
        self.layers = {name: m for name, m in model.named_modules()
                       if isinstance(m, Attention) and (m.is_cross_attention or not cross_attention_only)}
        if not self.layers:
            kind = "cross-attention " if cross_attention_only else ""
            raise ValueError(f"model has no {kind}Attention layers to record (is cross_attention_dim set?).")
        self.maps: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}

    def __enter__(self) -> "AttentionStore":
        for name, layer in self.layers.items():
            layer.captured = self.maps[name]
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers.values():
            layer.captured = None

    def token_maps(self, height: int, width: int) -> torch.Tensor:
        """Mean attention map per text token over all recorded layers, heads and calls, at one size.

        Each layer's (B, h, N, L) map is averaged over heads, laid out on its own grid (N = H·W / f²
        for a layer f times coarser than ``height`` × ``width``) and resized bilinearly to it.
        Returns (B, L, height, width); at each pixel the L values sum to 1.
        """
        resized = []
        for name, calls in self.maps.items():
            for probs in calls:
                B, _, N, L = probs.shape
                f = math.sqrt(height * width / N)  # how much coarser this layer's grid is
                h, w = round(height / f), round(width / f)
                if h * w != N:
                    raise ValueError(f"{name}: {N} tokens do not form a grid of aspect {height}×{width}.")
                grid = probs.mean(dim=1).transpose(1, 2).reshape(B, L, h, w)  # (B, L, h, w)
                resized.append(F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False))
        if not resized:
            raise ValueError("nothing recorded: run the model inside `with AttentionStore(model) as store:`.")
        return torch.stack(resized).mean(dim=0)  # (B, L, height, width)


class SelfAttention2d(Attention):
    """GroupNorm, then multi-head self-attention over the H·W pixels of a feature map, plus a residual.

    Give either ``num_heads`` (a fixed count) or ``head_dim`` (channels per head: diffusers'
    ``UNet2DModel``'s ``attention_head_dim``); neither means one head (SD's VAE).
    Keys: ``group_norm.*`` and ``Attention``'s (with biases), as diffusers' attention block.
    """

    def __init__(self, channels: int, num_heads: int | None = None, head_dim: int | None = None,
                 groups: int = SD_NORM_GROUPS, eps: float = SD_UNET_NORM_EPS) -> None:
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
        super().__init__(channels, heads=num_heads, dim_head=channels // num_heads, bias=True)
        self.num_heads = num_heads
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → (B, C, H, W)."""
        B, C, H, W = x.shape
        tokens = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, N, C), N = H·W pixels
        out = super().forward(tokens)  # (B, N, C)
        return x + out.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
