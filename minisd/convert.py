"""Between minisd and diffusers: the same models described in diffusers' terms (lesson 13 builds on this).

minisd's modules already carry diffusers' key names, so weights copy across with ``load_state_dict``;
what differs is how a model is *described*. These functions write a minisd config as the arguments
of diffusers' classes, so that diffusers can serve as the oracle for the U-Net, the VAE, the samplers
and the pipelines. Notation bridge: diffusers' ``UNet2DConditionModel(attention_head_dim=…)`` is, for
historical reasons, the number of heads h; minisd's ``num_attention_heads`` is h and its
``attention_head_dim`` the channels per head.
"""

from __future__ import annotations

from .nn.unet import UNetConfig
from .nn.vae import AutoencoderConfig
from .samplers import SAMPLERS
from .schedules import NoiseSchedule


def diffusers_unet_config(config: UNetConfig) -> dict:
    """Keyword arguments of diffusers' ``UNet2DConditionModel`` for the same conditional U-Net."""
    if config.cross_attention_dim is None:
        raise ValueError("config has no cross_attention_dim: it is a UNet2DModel, not a UNet2DConditionModel.")
    widths = config.block_out_channels
    return dict(
        sample_size=config.sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
        block_out_channels=widths, layers_per_block=config.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in config.attention[::-1]),
        attention_head_dim=tuple(config.heads(c) for c in widths),  # diffusers' name for h, per level
        norm_num_groups=config.norm_num_groups, norm_eps=config.norm_eps, dropout=config.dropout,
        cross_attention_dim=config.cross_attention_dim, use_linear_projection=config.use_linear_projection,
        transformer_layers_per_block=config.transformer_layers_per_block,
    )


def diffusers_vae_config(config: AutoencoderConfig) -> dict:
    """Keyword arguments of diffusers' ``AutoencoderKL`` (or ``VQModel``, with ``num_vq_embeddings``)."""
    levels = len(config.block_out_channels)
    return dict(in_channels=config.in_channels, out_channels=config.out_channels,
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
                latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups,
                sample_size=config.sample_size, scaling_factor=config.scaling_factor)


DIFFUSERS_SCHEDULERS = {  # minisd sampler → diffusers scheduler class and its extra arguments
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def diffusers_scheduler(sampler: str, schedule: NoiseSchedule, timestep_spacing: str = "leading", steps_offset: int = 1):
    """The diffusers scheduler that takes the same steps as ``samplers.sample(…, sampler)`` (SD's config by default)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown; use one of {SAMPLERS}.")
    import diffusers  # a test extra: only the oracles need it

    name, extra = DIFFUSERS_SCHEDULERS[sampler]
    return getattr(diffusers, name)(num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start,
                                    beta_end=schedule.beta_end, beta_schedule=schedule.beta_schedule,
                                    timestep_spacing=timestep_spacing, steps_offset=steps_offset, **extra)
