"""Stable Diffusion's networks at course size: embeddings, ResNet blocks, attention, the U-Net, the VAE."""

from .attention import SelfAttention2d
from .embeddings import TimestepEmbedding, timestep_embedding
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .blocks import count_parameters
from .unet import UNet, UNetConfig
from .vae import AutoencoderConfig, AutoencoderKL, VQModel

__all__ = [
    "AutoencoderConfig", "AutoencoderKL", "Downsample2D", "ResnetBlock2D", "SelfAttention2d", "TimestepEmbedding",
    "UNet", "UNetConfig", "Upsample2D", "VQModel", "count_parameters", "timestep_embedding",
]
