"""The denoising U-Net: Stable Diffusion's layout at any width (Ronneberger et al. 2015; Ho et al. 2020).

    x_t ─ conv_in ─ down levels ─ mid ─ up levels ─ norm, SiLU, conv_out ─ ε_pred
                        │   skips (concatenated)   ↑
                        └──────────────────────────┘

A level of the down path is ``layers_per_block`` ResNet blocks (each followed by self-attention
where ``attention`` says so), then a stride-2 conv except at the last level. The up path mirrors
it with ``layers_per_block + 1`` blocks per level, each taking one skip from the down path. The
timestep t enters every ResNet block through its embedding (``embeddings.py``).

Module names and parameter shapes are those of diffusers' ``UNet2DModel`` (and of the
``UNet2DConditionModel`` that holds SD v1, once lesson 08 adds cross-attention), so weights copy
across by renaming keys only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pathlib import Path

import torch
from torch import nn

from .attention import SelfAttention2d
from .blocks import Level, count_parameters
from .embeddings import TIME_EMBED_MULT, TimestepEmbedding, timestep_embedding
from .resnet import SD_UNET_NORM_EPS, Downsample2D, ResnetBlock2D, Upsample2D


@dataclass(frozen=True)
class UNetConfig:
    """A U-Net's shape. Defaults: the course's pixel DDPM on 1×32×32 glyphs; SD v1 values in comments."""

    in_channels: int = 1  # channels of x_t: 1 grey pixels, 3 RGB, 4 latents (SD: 4)
    out_channels: int = 1  # channels of ε_pred, same as x_t (SD: 4)
    sample_size: int = 32  # training resolution, H = W (SD: 64 latents for 512 px)
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # width per level, one level per resolution (SD: 320, 640, 1280, 1280)
    layers_per_block: int = 1  # ResNet blocks per down level; the up path uses one more (SD: 2)
    attention: tuple[bool, ...] = (False, False, True)  # self-attention at this level? (SD: True, True, True, False)
    attention_head_dim: int | None = 32  # channels per attention head, as in diffusers' UNet2DModel (SD: 40/80/160)
    num_attention_heads: int | None = None  # fixed head count at every level, overrides the above (SD: 8)
    norm_num_groups: int = 8  # GroupNorm groups; must divide every width (SD: 32)
    norm_eps: float = SD_UNET_NORM_EPS  # GroupNorm ε (SD: 1e-5)
    dropout: float = 0.0  # dropout inside the ResNet blocks (SD: 0.0)
    cross_attention_dim: int | None = None  # width of the text states to attend to: lesson 08 (SD v1: 768)

    def __post_init__(self) -> None:
        widths, levels = self.block_out_channels, len(self.block_out_channels)
        if levels < 1 or any(not isinstance(c, int) or c < 1 for c in widths):
            raise ValueError(f"block_out_channels must be a non-empty tuple of positive ints, got {widths!r}.")
        for c in widths:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels={widths} has {c}, not divisible by norm_num_groups={self.norm_num_groups}; "
                    f"use widths that are multiples of {self.norm_num_groups}, or a divisor of all of them."
                )
        if len(self.attention) != levels:
            raise ValueError(f"attention={self.attention} needs one bool per level of block_out_channels={widths} ({levels}).")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block} must be ≥ 1.")
        if self.sample_size % 2 ** (levels - 1):
            raise ValueError(
                f"sample_size={self.sample_size} is not divisible by 2^(levels - 1) = {2 ** (levels - 1)} "
                f"for {levels} levels; use a multiple of {2 ** (levels - 1)} or fewer levels."
            )
        attention_widths = [c for c, use in zip(widths, self.attention) if use] + [widths[-1]]  # mid block: always
        for c in attention_widths:
            if self.num_attention_heads is None and self.attention_head_dim and c % self.attention_head_dim:
                raise ValueError(f"attention_head_dim={self.attention_head_dim} must divide the width {c} of every "
                                 f"attention level (and the mid block, {widths[-1]}); attention widths: {attention_widths}.")
            if self.num_attention_heads and c % self.num_attention_heads:
                raise ValueError(f"num_attention_heads={self.num_attention_heads} must divide the width {c} of every "
                                 f"attention level (and the mid block); attention widths: {attention_widths}.")
        if self.cross_attention_dim is not None:
            raise ValueError("cross_attention_dim is reserved for lesson 08's SpatialTransformer; use None for now.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Inverse of ``to_dict`` (lists, as JSON gives them, become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class UNet(nn.Module):
    """ε_θ(x_t, t): predicts the noise in x_t (module docstring for the layout)."""

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = c = config
        widths, L, n = c.block_out_channels, len(c.block_out_channels), c.layers_per_block
        temb_channels = TIME_EMBED_MULT * widths[0]

        def resnet(cin: int, cout: int) -> ResnetBlock2D:
            return ResnetBlock2D(cin, cout, temb_channels, c.norm_num_groups, c.norm_eps, c.dropout)

        def attention(channels: int) -> SelfAttention2d:
            head_dim = None if c.num_attention_heads else c.attention_head_dim
            return SelfAttention2d(channels, c.num_attention_heads, head_dim, c.norm_num_groups, c.norm_eps)

        self.conv_in = nn.Conv2d(c.in_channels, widths[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], temb_channels)

        self.down_blocks = nn.ModuleList()
        for i, (cout, use_attention) in enumerate(zip(widths, c.attention)):
            cin = widths[max(i - 1, 0)]
            resnets = [resnet(cin if j == 0 else cout, cout) for j in range(n)]
            attentions = [attention(cout) for _ in range(n)] if use_attention else []
            down = [Downsample2D(cout)] if i < L - 1 else []
            self.down_blocks.append(Level(resnets, attentions, "downsamplers", down))

        self.mid_block = Level([resnet(widths[-1], widths[-1]) for _ in range(2)], [attention(widths[-1])])  # resnet, attn, resnet

        # Up path: level i works at width reversed(widths)[i]; resnet j takes the running features
        # concatenated with one skip. Skips pop in reverse push order: resnet outputs, then the
        # downsampler (or conv_in) output of the level above, whose width is the next level's.
        rev, rev_attention = widths[::-1], c.attention[::-1]
        self.up_blocks = nn.ModuleList()
        for i in range(L):
            prev, cout, skip_next = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, L - 1)]
            resnets = [resnet((prev if j == 0 else cout) + (skip_next if j == n else cout), cout) for j in range(n + 1)]
            attentions = [attention(cout) for _ in range(n + 1)] if rev_attention[i] else []
            up = [Upsample2D(cout)] if i < L - 1 else []
            self.up_blocks.append(Level(resnets, attentions, "upsamplers", up))

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, widths[0], eps=c.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, kernel_size=3, padding=1)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str | None = None) -> "UNet":
        """Build a U-Net from a shipped safetensors file: config from its header, then the weights.

        A file whose tensors do not fit the config raises a ValueError naming the keys.
        """
        from ..train import load_weights, read_metadata  # train does not import models: no cycle

        meta = read_metadata(path)
        if not meta.get("model_config"):
            raise ValueError(f"{path} has no model_config in its header; was it written by minisd.train.save_weights?")
        model = load_weights(cls(UNetConfig.from_dict(meta["model_config"])), path)
        return model.to(device or "cpu").eval()

    @property
    def num_parameters(self) -> int:
        return count_parameters(self)

    def _check_input(self, sample: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        """Validate ``sample`` and return the timesteps as a (B,) tensor."""
        levels = len(self.config.block_out_channels)
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample must be (B, {self.config.in_channels}, H, W) (in_channels); got {tuple(sample.shape)}.")
        if sample.shape[-2] % 2 ** (levels - 1) or sample.shape[-1] % 2 ** (levels - 1):
            raise ValueError(
                f"H and W must be divisible by 2^(levels - 1) = {2 ** (levels - 1)} for {levels} levels; "
                f"got {tuple(sample.shape[-2:])}."
            )
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])  # one t for the whole batch, (B,)
        if timestep.shape != (sample.shape[0],):
            raise ValueError(f"timestep must be an int or a (B,) = ({sample.shape[0]},) tensor; got shape {tuple(timestep.shape)}.")
        return timestep

    def forward(
        self, sample: torch.Tensor, timestep: int | torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict ε from x_t and t.

        Args:
            sample: x_t, (B, in_channels, H, W); H and W divisible by 2^(levels - 1).
            timestep: t in [0, T-1], an int or a (B,) tensor.
            encoder_hidden_states: text states for cross-attention (lesson 08); must be None here.
        Returns:
            ε_pred, (B, out_channels, H, W).
        """
        if encoder_hidden_states is not None:
            raise ValueError("encoder_hidden_states needs cross-attention (UNetConfig.cross_attention_dim, lesson 08).")
        timestep = self._check_input(sample, timestep)
        temb = self.time_embedding(timestep_embedding(timestep, self.config.block_out_channels[0]))  # (B, 4·C0)

        h = self.conv_in(sample)  # (B, C0, H, W)
        skips = [h]
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = resnet(h, temb)
                if len(level.attentions):
                    h = level.attentions[j](h)
                skips.append(h)
            for down in level.downsamplers:
                h = down(h)  # (B, C, H/2, W/2)
                skips.append(h)

        h = self.mid_block.resnets[0](h, temb)
        h = self.mid_block.attentions[0](h)
        h = self.mid_block.resnets[1](h, temb)

        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), temb)  # concatenate a skip on channels
                if len(level.attentions):
                    h = level.attentions[j](h)
            for up in level.upsamplers:
                h = up(h)  # (B, C, 2H, 2W)

        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, out_channels, H, W)
