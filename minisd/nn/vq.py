"""The VQ-regularised autoencoder of LDM: latents snap to a learned codebook (van den Oord et al. 2017).

Same encoder and decoder as ``vae.AutoencoderKL``; between them, instead of a Gaussian posterior,
each latent vector is replaced by its nearest codebook entry (``VectorQuantizer``). Module names
and shapes are diffusers' ``VQModel``, so its weights load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .vae import AutoencoderBase, AutoencoderConfig, Decoder, Encoder


class VectorQuantizer(nn.Module):
    """Snap each latent vector to its nearest codebook entry (van den Oord et al. 2017, §3.1–3.2, eq. 1–3).

    Forward returns z_q with a straight-through gradient (the decoder's gradient is copied to the
    encoder as if quantisation were the identity) and the loss
        ‖sg[z_e] − e‖²  +  β ‖z_e − sg[e]‖²      (eq. 3: codebook term, then commitment term)
    each squared norm averaged over all B·c·h·w values (``F.mse_loss``), so the loss does not grow
    with the batch or the grid. sg = stop-gradient (``.detach()``): the codebook term moves only the
    codebook, the commitment term only the encoder output. Lesson 05 writes this forward by hand.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta  # the paper's β: 0.25 works over a wide range (§4.1)
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data.uniform_(-1.0 / num_embeddings, 1.0 / num_embeddings)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_e (B, c, h, w) → (z_q (B, c, h, w), loss (), codes (B, h, w) int64 in [0, num_embeddings))."""
        if z.ndim != 4 or z.shape[1] != self.embedding.embedding_dim:
            raise ValueError(f"z must be (B, {self.embedding.embedding_dim}, h, w) (embedding_dim channels); "
                             f"got {tuple(z.shape)}.")
        B, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B·h·w, c): row b·h·w + y·w + x = position (b, y, x)
        codes = torch.cdist(flat, self.embedding.weight).argmin(dim=1)  # (B·h·w,) nearest entry (eq. 1)
        z_q = self.embedding(codes).reshape(B, h, w, c).permute(0, 3, 1, 2)  # (B, c, h, w)
        codebook_loss = F.mse_loss(z_q, z.detach())  # ‖sg[z_e] − e‖²: pulls the entries towards z_e
        commitment_loss = F.mse_loss(z, z_q.detach())  # ‖z_e − sg[e]‖²: keeps z_e near its entries
        loss = codebook_loss + self.beta * commitment_loss
        z_q = z + (z_q - z).detach()  # straight-through: forward is z_q, backward is identity
        return z_q, loss, codes.reshape(B, h, w)


class VQModel(AutoencoderBase):
    """The VQ-regularised autoencoder of LDM (its "VQ-f4" etc.): encoder, codebook, decoder."""

    def __init__(self, config: AutoencoderConfig = AutoencoderConfig()) -> None:
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config, c)  # no double_z: one vector per position
        self.quant_conv = nn.Conv2d(c, c, kernel_size=1)
        self.quantize = VectorQuantizer(config.num_vq_embeddings, c)
        self.post_quant_conv = nn.Conv2d(c, c, kernel_size=1)
        self.decoder = Decoder(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x → the continuous latents z_e, (B, c, H/f, W/f), before quantisation (as diffusers' VQModel)."""
        self._check_images(x)
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """z → x̂, quantising z first unless ``force_not_quantize`` (for latents already on the codebook)."""
        self._check_latents(z)
        if not force_not_quantize:
            z, _, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x → (x̂, VQ loss, codes (B, h, w))."""
        z_q, vq_loss, codes = self.quantize(self.encode(x))
        return self.decoder(self.post_quant_conv(z_q)), vq_loss, codes

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor, generator: torch.Generator | None = None,
                       sample_posterior: bool = False) -> torch.Tensor:
        """Images → quantised latents × scaling_factor (same signature as AutoencoderKL's)."""
        z_q, _, _ = self.quantize(self.encode(images))
        return z_q * self.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [-1, 1]; sampled latents are quantised first."""
        return self.decode(latents / self.config.scaling_factor).clamp(-1.0, 1.0)


def vq_loss(vae: VQModel, images: torch.Tensor, generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """VQ-VAE's objective (eq. 3) with an L1 reconstruction term, to compare with ``kl_vae_loss``."""
    reconstruction, quant_loss, codes = vae(images)
    rec = (images - reconstruction).abs().mean()
    used = codes.unique().numel() / vae.config.num_vq_embeddings
    return rec + quant_loss, {"l1": rec.item(), "vq": quant_loss.item(), "codebook_usage": used}
