"""The autoencoder of latent diffusion: images in, a small latent grid out, and back (Rombach et al. 2022, §3).

    x (B, 3, H, W) ─ Encoder ─ quant_conv ─ posterior q(z|x) ─ z (B, c, H/f, W/f) ─ post_quant_conv ─ Decoder ─ x̂

The Encoder is ``levels`` resolution levels of ResNet blocks with a stride-2 conv between them,
so the compression factor is f = 2^(levels − 1); then a mid block (ResNet, self-attention,
ResNet) and a conv to the latent channels. The Decoder mirrors it with nearest-neighbour
upsampling. Nothing here sees a timestep: ``ResnetBlock2D`` is built without ``temb``.

Two ways to keep the latent space tame (§3, "Perceptual Image Compression"):

* **KL-reg** (``AutoencoderKL``, what SD ships): the encoder outputs the mean and log-variance of
  a diagonal Gaussian q(z|x) (``double_z``); training adds a small KL(q(z|x) ‖ N(0, I)) penalty
  (SD: weight 1e-6), so latents stay near unit scale without losing detail.
* **VQ-reg** (``VQModel``, in ``vq.py``): latents snap to the nearest vector of a learned codebook (van den
  Oord et al. 2017), trained with a straight-through gradient and a commitment loss.

Module names and shapes are diffusers' ``AutoencoderKL`` / ``VQModel``, so SD's VAE weights load
by renaming keys only (lesson 13). Differences from diffusers' API, kept small on purpose:
``encode`` returns the posterior itself (diffusers: ``.latent_dist``) and ``decode`` a tensor
(diffusers: ``.sample``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .attention import SelfAttention2d
from .resnet import SD_VAE_NORM_EPS, Downsample2D, ResnetBlock2D, Upsample2D
from ..checkpoints import load_model
from .blocks import Level, count_parameters

SD_SCALING_FACTOR = 0.18215  # SD v1's 1 / std of its VAE's latents, measured on its training images
LOGVAR_RANGE = (-30.0, 20.0)  # SD clamps log σ² here so exp() never overflows or underflows


@dataclass(frozen=True)
class AutoencoderConfig:
    """An autoencoder's shape. Defaults: the course's VAE (f = 4, 4×8×8 latents for 32×32 RGB); SD v1 in comments."""

    in_channels: int = 3  # image channels (SD: 3)
    out_channels: int = 3  # reconstructed channels (SD: 3)
    latent_channels: int = 4  # c of the latent grid (SD: 4)
    block_out_channels: tuple[int, ...] = (64, 128, 128)  # one per level; f = 2^(levels − 1) (SD: 128, 256, 512, 512 → f = 8)
    layers_per_block: int = 1  # ResNet blocks per encoder level; the decoder uses one more (SD: 2)
    norm_num_groups: int = 16  # GroupNorm groups; must divide every width (SD: 32)
    sample_size: int = 32  # training resolution (SD v1: 512, then 256 px fine-tuning)
    scaling_factor: float = 1.0  # latents × this ≈ unit variance; measured after training (SD: 0.18215)
    num_vq_embeddings: int = 256  # codebook size, VQModel only (LDM's VQ-f4: 8192)

    def __post_init__(self) -> None:
        widths = self.block_out_channels
        if not widths or any(not isinstance(c, int) or c < 1 for c in widths):
            raise ValueError(f"block_out_channels must be a non-empty tuple of positive ints, got {widths!r}.")
        bad = [c for c in widths if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels={widths} has {bad}, not divisible by norm_num_groups="
                             f"{self.norm_num_groups}; use multiples of it.")
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block} and latent_channels={self.latent_channels} must be ≥ 1.")
        if self.sample_size % self.downsample_factor:
            raise ValueError(f"sample_size={self.sample_size} must be a multiple of f = {self.downsample_factor}.")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor={self.scaling_factor} must be > 0.")

    @classmethod
    def stable_diffusion_v1(cls) -> "AutoencoderConfig":
        """SD v1.x's VAE (also SD 2.x's): f = 8, 4×64×64 latents for 512² images, 83,653,863 parameters."""
        return cls(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512,
                   scaling_factor=SD_SCALING_FACTOR)

    @property
    def downsample_factor(self) -> int:
        """f: each side of the latent grid is 1/f of the image's."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, H/f, W/f) at ``sample_size``."""
        side = self.sample_size // self.downsample_factor
        return (self.latent_channels, side, side)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _resnet(config: AutoencoderConfig, cin: int, cout: int) -> ResnetBlock2D:
    return ResnetBlock2D(cin, cout, None, config.norm_num_groups, SD_VAE_NORM_EPS)


def _mid_block(config: AutoencoderConfig, channels: int) -> Level:
    """ResNet, one-head self-attention over all latent positions, ResNet: the only global mixing."""
    attention = SelfAttention2d(channels, groups=config.norm_num_groups, eps=SD_VAE_NORM_EPS)
    return Level([_resnet(config, channels, channels) for _ in range(2)], [attention])


def _run_mid(mid: Level, h: torch.Tensor) -> torch.Tensor:
    return mid.resnets[1](mid.attentions[0](mid.resnets[0](h)))


class Encoder(nn.Module):
    """x (B, in_channels, H, W) → (B, out_channels, H/f, W/f): 2c (mean, log σ²) for KL, c for VQ."""

    def __init__(self, config: AutoencoderConfig, out_channels: int) -> None:
        super().__init__()
        widths, n = config.block_out_channels, config.layers_per_block
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, cout in enumerate(widths):
            cin = widths[max(i - 1, 0)]
            resnets = [_resnet(config, cin if j == 0 else cout, cout) for j in range(n)]
            # SD pads right/bottom only before its stride-2 conv (padding=0): keep that for its weights
            down = [Downsample2D(cout, padding=0)] if i < len(widths) - 1 else []
            self.down_blocks.append(Level(resnets, [], "downsamplers", down))
        self.mid_block = _mid_block(config, widths[-1])
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, widths[-1], eps=SD_VAE_NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            for resnet in level.resnets:
                h = resnet(h)
            for down in level.downsamplers:
                h = down(h)  # (B, C, H/2, W/2)
        h = _run_mid(self.mid_block, h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) → x̂ (B, out_channels, f·h, f·w)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        rev, n = config.block_out_channels[::-1], config.layers_per_block
        self.conv_in = nn.Conv2d(config.latent_channels, rev[0], kernel_size=3, padding=1)
        self.mid_block = _mid_block(config, rev[0])
        self.up_blocks = nn.ModuleList()
        for i, cout in enumerate(rev):
            cin = rev[max(i - 1, 0)]
            resnets = [_resnet(config, cin if j == 0 else cout, cout) for j in range(n + 1)]
            up = [Upsample2D(cout)] if i < len(rev) - 1 else []
            self.up_blocks.append(Level(resnets, [], "upsamplers", up))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, rev[-1], eps=SD_VAE_NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(rev[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid_block, self.conv_in(z))
        for level in self.up_blocks:
            for resnet in level.resnets:
                h = resnet(h)
            for up in level.upsamplers:
                h = up(h)  # (B, C, 2H, 2W)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class DiagonalGaussianDistribution:
    """q(z|x) = N(μ, diag σ²) from the encoder's 2c channels (first c: μ, last c: log σ²)."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)  # each (B, c, h, w)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ ⊙ ε, ε ~ N(0, I): the reparameterisation trick (Kingma & Welling 2014, eq. 10)."""
        # drawn on the generator's device (a CPU generator gives the same z on every device), in the
        # latents' dtype so that a float16/bfloat16 VAE stays in that dtype
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The most likely z, μ: what to use when a deterministic latent is wanted."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) ‖ N(0, I)) per image, (B,): ½ Σ (μ² + σ² − 1 − log σ²) (Kingma & Welling 2014, App. B)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)


class AutoencoderBase(nn.Module):
    """What both autoencoders share: config checks, the scaled-latent helpers and ``from_pretrained``."""

    config_class = AutoencoderConfig  # how checkpoints.load_model rebuilds the config from a header
    config: AutoencoderConfig

    def _check_images(self, x: torch.Tensor) -> None:
        c, f = self.config, self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"images must be (B, {c.in_channels}, H, W) (in_channels); got {tuple(x.shape)}.")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of f = {f} (the downsample factor); "
                             f"got {tuple(x.shape[-2:])}.")

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"latents must be (B, {self.config.latent_channels}, h, w) (latent_channels); got {tuple(z.shape)}.")

    @property
    def num_parameters(self) -> int:
        return count_parameters(self)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """decode_latents(encode_latents(images)), batch by batch on the model's device, returned on
        the images' device: deterministic latents (posterior mean for KL, codebook for VQ)."""
        device = next(self.parameters()).device
        return torch.cat([self.decode_latents(self.encode_latents(x.to(device))).to(images.device)
                          for x in images.split(batch_size)])

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str | None = None):
        """Build from a shipped safetensors file: config from its header, then the weights.

        Half-precision files (the course ships some as float16) load into float32 models; a file
        that holds another model class, or that does not match its card, raises a ValueError.
        """
        return load_model(cls, path, device)


class AutoencoderKL(AutoencoderBase):
    """The KL-regularised VAE of Stable Diffusion (module docstring)."""

    def __init__(self, config: AutoencoderConfig = AutoencoderConfig()) -> None:
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config, 2 * c)  # double_z: mean and log-variance
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(c, c, kernel_size=1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """x (B, 3, H, W) in [-1, 1] → the posterior q(z|x) over (B, c, H/f, W/f) latents (unscaled)."""
        self._check_images(x)
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, c, h, w), unscaled → x̂ (B, 3, f·h, f·w), roughly in [-1, 1] (not clamped)."""
        self._check_latents(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct x through a sampled (training) or mean (``sample_posterior=False``) latent."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor, generator: torch.Generator | None = None,
                       sample_posterior: bool = False) -> torch.Tensor:
        """Images → latents × scaling_factor, the unit-scale latents diffusion works on (eval helper)."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return z * self.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (what a sampler returns) → images clamped to [-1, 1] (eval helper)."""
        return self.decode(latents / self.config.scaling_factor).clamp(-1.0, 1.0)


class PixelSpace(nn.Module):
    """No autoencoder at all: the "latents" are the pixels themselves, f = 1.

    The LDM paper's LDM-1 (§4.1, Fig. 6) is exactly this, a diffusion model in pixel space, the
    baseline every latent model is compared with. It has the helpers a latent diffusion model
    needs (``config.latent_shape``, ``encode_latents``, ``decode_latents``, ``reconstruct``), so
    ``scripts/train_latent_diffusion.py --autoencoder pixels`` trains lesson 03's kind of model
    with lesson 06's recipe. Nothing is learned; ``reconstruct`` is exact.
    """

    def __init__(self, sample_size: int = 32, channels: int = 3) -> None:
        super().__init__()
        # one resolution level (f = 1), latent channels = image channels, latents = pixels (scale 1)
        self.config = AutoencoderConfig(in_channels=channels, out_channels=channels, latent_channels=channels,
                                        block_out_channels=(channels,), norm_num_groups=1, sample_size=sample_size)

    @property
    def num_parameters(self) -> int:
        return 0

    def _check(self, x: torch.Tensor, name: str) -> torch.Tensor:
        c, side, _ = self.config.latent_shape
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"{name} must be (B, {c}, H, W); got {tuple(x.shape)}.")
        return x

    def encode_latents(self, images: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The images, unchanged: pixels in [-1, 1] already have about unit scale."""
        return self._check(images, "images")

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents clamped to [-1, 1], as every decoder's output is."""
        return self._check(latents, "latents").clamp(-1.0, 1.0)

    def reconstruct(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return self.decode_latents(self.encode_latents(images))


def kl_vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float = 1e-6,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """SD's autoencoder objective without its perceptual and GAN terms (LDM App. G):

        L = mean |x − x̂|  +  kl_weight · KL(q(z|x) ‖ N(0, I)) / (pixels per image)

    SD sums both terms over each image; dividing both by the pixel count keeps SD's meaning of
    ``kl_weight`` (1e-6) while the loss reads as a per-pixel L1. Returns (loss, parts for logging).
    """
    if kl_weight < 0:
        raise ValueError(f"kl_weight={kl_weight} must be ≥ 0.")
    reconstruction, posterior = vae(images, sample_posterior=True, generator=generator)
    rec = (images - reconstruction).abs().mean()
    kl = posterior.kl().mean()
    loss = rec + kl_weight * kl / images[0].numel()
    return loss, {"l1": rec.item(), "kl": kl.item()}


def scaling_factor_from_latents(latents: torch.Tensor) -> float:
    """1 / std of unscaled latents: how LDM rescaled KL latents, with σ̂ from its first batch (SD: 0.18215)."""
    if latents.numel() < 2:
        raise ValueError("latents needs at least 2 numbers to measure a standard deviation.")
    return 1.0 / latents.float().std().item()

