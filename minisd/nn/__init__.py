"""Stable Diffusion's networks at course size: embeddings, ResNet blocks, attention, the spatial transformer,
the U-Net, the VAE."""

from .attention import Attention, AttentionStore, SelfAttention2d
from .embeddings import TimestepEmbedding, timestep_embedding
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .blocks import count_parameters
from .transformer import BasicTransformerBlock, Transformer2DModel
from .unet import UNet, UNetConfig
from .vae import AutoencoderConfig, AutoencoderKL
from .vq import VQModel

__all__ = [
    "Attention", "AttentionStore", "AutoencoderConfig", "AutoencoderKL", "BasicTransformerBlock", "Downsample2D",
    "ResnetBlock2D", "SelfAttention2d", "TimestepEmbedding", "Transformer2DModel", "UNet", "UNetConfig", "Upsample2D",
    "VQModel", "count_parameters", "timestep_embedding",
]
