"""Stable Diffusion's networks at course size: embeddings, ResNet blocks, attention, the U-Net."""

from .attention import SelfAttention2d
from .embeddings import TimestepEmbedding, timestep_embedding
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .unet import UNet, UNetConfig, count_parameters

__all__ = [
    "Downsample2D", "ResnetBlock2D", "SelfAttention2d", "TimestepEmbedding", "UNet", "UNetConfig",
    "Upsample2D", "count_parameters", "timestep_embedding",
]
