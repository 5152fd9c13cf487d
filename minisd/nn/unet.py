"""The denoising U-Net: Stable Diffusion's layout at any width (Ronneberger et al. 2015; Ho et al. 2020).

    x_t ─ conv_in ─ down levels ─ mid ─ up levels ─ norm, SiLU, conv_out ─ ε_pred
                        │   skips (concatenated)   ↑
                        └──────────────────────────┘

A level of the down path is ``layers_per_block`` ResNet blocks (each followed by attention where
``attention`` says so), then a stride-2 conv except at the last level. The up path mirrors it with
``layers_per_block + 1`` blocks per level, each taking one skip from the down path. The timestep t
enters every ResNet block through its embedding (``embeddings.py``); the mid block always attends.

Two models, one class, chosen by ``UNetConfig.cross_attention_dim``:

- None: unconditional ε_θ(x_t, t), diffusers' ``UNet2DModel`` (attention = ``SelfAttention2d``);
- set: text-conditioned ε_θ(x_t, t, c), diffusers' ``UNet2DConditionModel`` that holds SD v1/2
  (attention = ``Transformer2DModel``: self-attention, cross-attention to the text states c,
  feed-forward; ``transformer.py``). Rombach et al. 2022, eq. 3.

Module names and parameter shapes are diffusers', so weights copy across with identical keys.

Notation bridge for heads: here ``num_attention_heads`` is the head count h and
``attention_head_dim`` the channels per head d (h·d = width), as in diffusers' ``UNet2DModel``.
diffusers' ``UNet2DConditionModel`` instead stores h in its ``attention_head_dim`` (SD v1: 8; SD 2.1:
(5, 10, 20, 20), which is d = 64 at every level here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import load_model
from .attention import SelfAttention2d
from .blocks import Level, count_parameters
from .embeddings import TIME_EMBED_MULT, TimestepEmbedding, timestep_embedding
from .resnet import SD_UNET_NORM_EPS, Downsample2D, ResnetBlock2D, Upsample2D
from .transformer import Transformer2DModel

CROSS_ATTENTION_FIELDS = ("use_linear_projection", "transformer_layers_per_block")  # only mean something with text


@dataclass(frozen=True)
class UNetConfig:
    """A U-Net's shape. Defaults: the course's pixel DDPM on 1×32×32 glyphs; SD v1 values in comments."""

    in_channels: int = 1  # channels of x_t: 1 grey pixels, 3 RGB, 4 latents (SD: 4)
    out_channels: int = 1  # channels of ε_pred, same as x_t (SD: 4)
    sample_size: int = 32  # training resolution, H = W (SD: 64 latents for 512 px)
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # width per level, one level per resolution (SD: 320, 640, 1280, 1280)
    layers_per_block: int = 1  # ResNet blocks per down level; the up path uses one more (SD: 2)
    attention: tuple[bool, ...] = (False, False, True)  # attention at this level? (SD: True, True, True, False)
    attention_head_dim: int | None = 32  # d, channels per attention head (SD v1: 40/80/160; SD 2.1: 64)
    num_attention_heads: int | None = None  # h, a fixed head count at every level; overrides the above (SD v1: 8)
    norm_num_groups: int = 8  # GroupNorm groups; must divide every width (SD: 32)
    norm_eps: float = SD_UNET_NORM_EPS  # GroupNorm ε (SD: 1e-5)
    dropout: float = 0.0  # dropout inside the ResNet blocks (SD: 0.0)
    cross_attention_dim: int | None = None  # width of the text states; None: unconditional (SD v1: 768, 2.x: 1024)
    use_linear_projection: bool = False  # transformer proj_in/proj_out as Linear (SD 2.x), not 1×1 conv (SD v1)
    transformer_layers_per_block: int = 1  # BasicTransformerBlocks per attention (SD v1/2: 1)

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
        if self.cross_attention_dim is not None and self.cross_attention_dim < 1:
            raise ValueError(f"cross_attention_dim={self.cross_attention_dim} must be ≥ 1, or None for no text input.")
        if self.transformer_layers_per_block < 1:
            raise ValueError(f"transformer_layers_per_block={self.transformer_layers_per_block} must be ≥ 1.")
        if self.cross_attention_dim is None:
            for name, default in self._cross_attention_defaults().items():
                if getattr(self, name) != default:
                    raise ValueError(f"{name}={getattr(self, name)!r} only applies with cross-attention; "
                                     f"set cross_attention_dim too, or leave {name}={default!r}.")

    @classmethod
    def _cross_attention_defaults(cls) -> dict:
        return {f.name: f.default for f in fields(cls) if f.name in CROSS_ATTENTION_FIELDS}

    def heads(self, channels: int) -> int:
        """h at a level of width ``channels``: num_attention_heads, else channels / attention_head_dim, else 1."""
        if self.num_attention_heads:
            return self.num_attention_heads
        return channels // self.attention_head_dim if self.attention_head_dim else 1

    def to_dict(self) -> dict:
        """The fields as a dict; an unconditional model leaves out the cross-attention fields, which are
        then at their defaults, so its dict is the one written before cross-attention existed."""
        d = asdict(self)
        if self.cross_attention_dim is None:
            for name in CROSS_ATTENTION_FIELDS:
                d.pop(name)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Inverse of ``to_dict`` (lists, as JSON gives them, become tuples; missing fields take defaults)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def stable_diffusion_v1(cls) -> "UNetConfig":
        """SD v1.1–v1.5's U-Net (runwayml/stable-diffusion-v1-5, unet/config.json): 859,520,964 parameters."""
        return cls(in_channels=4, out_channels=4, sample_size=64, block_out_channels=(320, 640, 1280, 1280),
                   layers_per_block=2, attention=(True, True, True, False), attention_head_dim=None,
                   num_attention_heads=8, norm_num_groups=32, cross_attention_dim=768)

    @classmethod
    def stable_diffusion_v2(cls) -> "UNetConfig":
        """SD 2.0/2.1's U-Net at 768 px (stabilityai/stable-diffusion-2-1): 865,910,724 parameters.

        64 channels per head (diffusers writes its head counts, attention_head_dim=(5, 10, 20, 20)),
        OpenCLIP-H text states (1024), Linear projections. Its ``upcast_attention=True`` only changes
        diffusers' non-fused fp16 path; the fused attention used here needs no such flag.
        """
        return cls(in_channels=4, out_channels=4, sample_size=96, block_out_channels=(320, 640, 1280, 1280),
                   layers_per_block=2, attention=(True, True, True, False), attention_head_dim=64,
                   norm_num_groups=32, cross_attention_dim=1024, use_linear_projection=True)


class UNet(nn.Module):
    """ε_θ(x_t, t) or, with ``cross_attention_dim``, ε_θ(x_t, t, c): predicts the noise in x_t (module docstring)."""

    config_class = UNetConfig  # how checkpoints.load_model rebuilds the config from a header

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = c = config
        widths, L, n = c.block_out_channels, len(c.block_out_channels), c.layers_per_block
        temb_channels = TIME_EMBED_MULT * widths[0]

        def resnet(cin: int, cout: int) -> ResnetBlock2D:
            return ResnetBlock2D(cin, cout, temb_channels, c.norm_num_groups, c.norm_eps, c.dropout)

        def attention(channels: int) -> nn.Module:
            if c.cross_attention_dim is None:  # UNet2DModel: self-attention only
                return SelfAttention2d(channels, c.heads(channels), None, c.norm_num_groups, c.norm_eps)
            return Transformer2DModel(channels, c.heads(channels), c.cross_attention_dim, c.transformer_layers_per_block,
                                      c.norm_num_groups, c.use_linear_projection)

        self.conv_in = nn.Conv2d(c.in_channels, widths[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], temb_channels)

        self.down_blocks = nn.ModuleList()  # diffusers: (CrossAttn|Attn)DownBlock2D where attention[i], else DownBlock2D
        for i, (cout, use_attention) in enumerate(zip(widths, c.attention)):
            cin = widths[max(i - 1, 0)]
            resnets = [resnet(cin if j == 0 else cout, cout) for j in range(n)]
            attentions = [attention(cout) for _ in range(n)] if use_attention else []
            down = [Downsample2D(cout)] if i < L - 1 else []
            self.down_blocks.append(Level(resnets, attentions, "downsamplers", down))

        # resnet, attention, resnet (diffusers: UNetMidBlock2D or UNetMidBlock2DCrossAttn)
        self.mid_block = Level([resnet(widths[-1], widths[-1]) for _ in range(2)], [attention(widths[-1])])

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

        A file that holds another model, or whose tensors do not fit the config, raises a ValueError.
        """
        return load_model(cls, path, device)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self)

    def _check_input(self, sample: torch.Tensor, timestep: int | torch.Tensor,
                     encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        """Validate the inputs and return the timesteps as a (B,) tensor."""
        c, levels = self.config, len(self.config.block_out_channels)
        if sample.ndim != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(f"sample must be (B, {c.in_channels}, H, W) (in_channels); got {tuple(sample.shape)}.")
        if sample.shape[-2] % 2 ** (levels - 1) or sample.shape[-1] % 2 ** (levels - 1):
            raise ValueError(
                f"H and W must be divisible by 2^(levels - 1) = {2 ** (levels - 1)} for {levels} levels; "
                f"got {tuple(sample.shape[-2:])}."
            )
        B = sample.shape[0]
        if c.cross_attention_dim is None and encoder_hidden_states is not None:
            raise ValueError("encoder_hidden_states was given, but this U-Net has no cross-attention "
                             "(UNetConfig.cross_attention_dim=None); pass None, or build it with cross_attention_dim set.")
        if c.cross_attention_dim is not None:
            if encoder_hidden_states is None:
                raise ValueError(f"encoder_hidden_states is required: text states (B, L, {c.cross_attention_dim}) "
                                 f"(cross_attention_dim={c.cross_attention_dim}); for no text, encode the empty prompt.")
            shape = tuple(encoder_hidden_states.shape)
            if len(shape) != 3 or shape[-1] != c.cross_attention_dim:
                raise ValueError(f"encoder_hidden_states must be (B, L, cross_attention_dim={c.cross_attention_dim}); "
                                 f"got {shape}.")
            if shape[0] != B:
                raise ValueError(f"encoder_hidden_states has batch {shape[0]}, sample has {B}; give one text per sample "
                                 f"(repeat_interleave the states for several samples per prompt).")
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)  # one t for the whole batch, (B,)
        if timestep.shape != (B,):
            raise ValueError(f"timestep must be an int or a (B,) = ({B},) tensor; got shape {tuple(timestep.shape)}.")
        return timestep

    def forward(
        self, sample: torch.Tensor, timestep: int | torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict ε from x_t, t and (with cross-attention) the text states c.

        Args:
            sample: x_t, (B, in_channels, H, W); H and W divisible by 2^(levels - 1).
            timestep: t in [0, T-1], an int or a (B,) tensor.
            encoder_hidden_states: c, per-token text states (B, L, cross_attention_dim); required when
                ``config.cross_attention_dim`` is set, None otherwise.
        Returns:
            ε_pred, (B, out_channels, H, W), in the sample's dtype.
        """
        timestep = self._check_input(sample, timestep, encoder_hidden_states)
        context = () if encoder_hidden_states is None else (encoder_hidden_states,)  # extra argument of attentions
        t_emb = timestep_embedding(timestep, self.config.block_out_channels[0]).to(sample.dtype)  # float32 → fp16/bf16
        temb = self.time_embedding(t_emb)  # (B, 4·C0)

        h = self.conv_in(sample)  # (B, C0, H, W)
        skips = [h]
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = resnet(h, temb)
                if len(level.attentions):
                    h = level.attentions[j](h, *context)
                skips.append(h)
            for down in level.downsamplers:
                h = down(h)  # (B, C, H/2, W/2)
                skips.append(h)

        h = self.mid_block.resnets[0](h, temb)
        h = self.mid_block.attentions[0](h, *context)
        h = self.mid_block.resnets[1](h, temb)

        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), temb)  # concatenate a skip on channels
                if len(level.attentions):
                    h = level.attentions[j](h, *context)
            for up in level.upsamplers:
                h = up(h)  # (B, C, 2H, 2W)

        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, out_channels, H, W)
