"""Between minisd and diffusers: the same models described in diffusers' terms (lesson 13 builds on this).

minisd's modules already carry diffusers' key names, so weights copy across with ``load_state_dict``;
what differs is how a model is *described*. These functions write a minisd config as the arguments
of diffusers' classes, so that diffusers can serve as the oracle for the U-Net, the VAE, the samplers
and the pipelines. Notation bridge: diffusers' ``UNet2DConditionModel(attention_head_dim=…)`` is, for
historical reasons, the number of heads h; minisd's ``num_attention_heads`` is h and its
``attention_head_dim`` the channels per head.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .nn.unet import UNet, UNetConfig
from .nn.vae import AutoencoderConfig, AutoencoderKL
from .prediction import check_prediction_type
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


def diffusers_scheduler(sampler: str, schedule: NoiseSchedule, timestep_spacing: str = "leading", steps_offset: int = 1,
                        prediction_type: str = "epsilon", use_karras_sigmas: bool = False):
    """The diffusers scheduler that takes the same steps as ``samplers.sample(…, sampler)`` (SD's config by default),
    with the same ``prediction_type`` and ``use_karras_sigmas``. diffusers 0.42's EulerAncestralDiscreteScheduler
    has no Karras option (``sample`` uses EulerDiscreteScheduler's grid for it): that case is a ValueError here."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown; use one of {SAMPLERS}.")
    check_prediction_type(prediction_type)
    karras = dict(use_karras_sigmas=True) if use_karras_sigmas else {}
    if use_karras_sigmas and sampler not in ("euler", "heun", "dpmpp_2m"):
        raise ValueError(f"diffusers' scheduler for sampler={sampler!r} has no use_karras_sigmas option; "
                         "it has for 'euler', 'heun' and 'dpmpp_2m'.")
    import diffusers  # a test extra: only the oracles need it

    name, extra = DIFFUSERS_SCHEDULERS[sampler]
    return getattr(diffusers, name)(num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start,
                                    beta_end=schedule.beta_end, beta_schedule=schedule.beta_schedule,
                                    timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                                    prediction_type=prediction_type, **karras, **extra)


# ----------------------------------------------------------------------------- the original (CompVis) layout
# Stable Diffusion's own checkpoints (sd-v1-5.ckpt / .safetensors, one file) name the same tensors after
# the LDM code base: model.diffusion_model.* (U-Net), first_stage_model.* (VAE),
# cond_stage_model.transformer.* (CLIP's text tower). These maps go from each minisd key to its
# CompVis key; reading a file inverts them, so the same rules serve both directions.

UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    """Replace the leading module name of ``rest`` ("norm1.weight") by its entry in ``table``."""
    for ours, theirs in table.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def unet_key_to_compvis(key: str, config: UNetConfig) -> str:
    """minisd/diffusers U-Net key → SD's ``model.diffusion_model.*`` key (LDM's ``openaimodel.py`` names)."""
    n = config.layers_per_block
    parts = key.split(".")
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for ours, theirs in top.items():
        if key.startswith(ours + "."):
            return UNET_PREFIX + theirs + key[len(ours):]
    if parts[0] == "mid_block":  # resnets.0, attentions.0, resnets.1 → middle_block.0, .1, .2
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
        rest = ".".join(parts[3:])
        return f"{UNET_PREFIX}middle_block.{index}." + (_rename(rest, _UNET_RESNET) if index != 1 else rest)
    level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if parts[0] == "down_blocks":
        block = 1 + level * (n + 1) + (n if kind == "downsamplers" else j)
        where = {"resnets": "0." + _rename(rest, _UNET_RESNET), "attentions": "1." + rest, "downsamplers": "0.op." + rest[5:]}
        return f"{UNET_PREFIX}input_blocks.{block}.{where[kind]}"
    if parts[0] == "up_blocks":
        block = level * (n + 1) + (n if kind == "upsamplers" else j)
        upsampler = 2 if config.attention[::-1][level] else 1  # after the resnet (and the transformer, if any)
        where = {"resnets": "0." + _rename(rest, _UNET_RESNET), "attentions": "1." + rest,
                 "upsamplers": f"{upsampler}." + rest}
        return f"{UNET_PREFIX}output_blocks.{block}.{where[kind]}"
    raise ValueError(f"no CompVis name for U-Net key {key!r}.")


def vae_key_to_compvis(key: str, config: AutoencoderConfig) -> str:
    """minisd/diffusers VAE key → SD's ``first_stage_model.*`` key (LDM's ``autoencoder.py`` names)."""
    levels = len(config.block_out_channels)
    side, rest = key.split(".", 1)  # encoder / decoder / quant_conv / post_quant_conv
    if side not in ("encoder", "decoder"):
        return VAE_PREFIX + key
    parts = rest.split(".")
    if parts[0] in ("conv_norm_out", "conv_in", "conv_out"):
        return f"{VAE_PREFIX}{side}.{'norm_out' if parts[0] == 'conv_norm_out' else parts[0]}.{'.'.join(parts[1:])}"
    if parts[0] == "mid_block":
        name = {"resnets.0": "block_1", "resnets.1": "block_2", "attentions.0": "attn_1"}[".".join(parts[1:3])]
        tail = ".".join(parts[3:])
        tail = _rename(tail, _VAE_ATTENTION) if name == "attn_1" else _rename(tail, {"conv_shortcut": "nin_shortcut"})
        return f"{VAE_PREFIX}{side}.mid.{name}.{tail}"
    level, kind, j, tail = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
    ldm_level = level if side == "encoder" else levels - 1 - level  # LDM numbers decoder levels from the top
    direction = "down" if side == "encoder" else "up"
    if kind == "resnets":
        return f"{VAE_PREFIX}{side}.{direction}.{ldm_level}.block.{j}.{_rename(tail, {'conv_shortcut': 'nin_shortcut'})}"
    return f"{VAE_PREFIX}{side}.{direction}.{ldm_level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{tail}"


def _is_vae_attention_projection(compvis_key: str) -> bool:
    return ".mid.attn_1." in compvis_key and compvis_key.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out") \
        and compvis_key.endswith(".weight")


def _expected(model_cls, config) -> dict[str, tuple[int, ...]]:
    """minisd key → shape for ``model_cls(config)``, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model_cls(config).state_dict().items()}


def describe_checkpoint(state: dict[str, torch.Tensor]) -> str:
    """What a single-file checkpoint looks like: "SD v1.x", or which other model, from tell-tale keys and shapes."""
    to_k = state.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if any(k.startswith(("conditioner.embedders", UNET_PREFIX + "label_emb")) for k in state):
        return "SD XL (two text encoders, a label embedding)"
    if any(k.startswith("cond_stage_model.model.") for k in state) or (to_k is not None and to_k.shape[1] == 1024):
        return "SD 2.x (OpenCLIP ViT-H text encoder, 1024-wide cross-attention)"
    if conv_in is not None and conv_in.shape[1] != 4:
        return f"an SD v1.x variant with {conv_in.shape[1]} input channels (the inpainting model has 9)"
    if to_k is not None and to_k.shape[1] == 768:
        return "SD v1.x"
    return "not a Stable Diffusion checkpoint (no model.diffusion_model.* U-Net keys of SD's shapes)"


def _convert(state: dict, names: dict[str, str], expected: dict[str, tuple], prefix: str, what: str) -> dict:
    """Pick and rename one part's tensors; a ValueError naming missing, extra and wrongly shaped keys."""
    compvis = {k: v for k, v in state.items() if k.startswith(prefix)}
    missing = [theirs for theirs in names.values() if theirs not in compvis]
    extra = sorted(set(compvis) - set(names.values()))
    out, shapes = {}, []
    for ours, theirs in names.items():
        if theirs not in compvis:
            continue
        tensor = compvis[theirs]
        if tensor.ndim == 4 and len(expected[ours]) == 2 and _is_vae_attention_projection(theirs):
            tensor = tensor[:, :, 0, 0]  # LDM's VAE attention uses 1×1 convolutions; ours (and diffusers') Linear
        if tuple(tensor.shape) != expected[ours]:
            shapes.append(f"{theirs}: file {tuple(tensor.shape)} vs model {expected[ours]}")
        out[ours] = tensor
    if missing or extra or shapes:
        problems = [f"{name} ({len(items)}): {', '.join(items[:3])}{', …' if len(items) > 3 else ''}"
                    for name, items in (("missing", missing), ("unexpected", extra), ("wrong shapes", shapes)) if items]
        raise ValueError(f"the {what} in this checkpoint does not fit the configured model; it looks like "
                         f"{describe_checkpoint(state)}; minisd supports SD v1.x. " + "; ".join(problems))
    return out


def unet_from_compvis(state: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """The U-Net's tensors of a CompVis checkpoint, renamed for ``UNet(config)`` (and diffusers)."""
    expected = _expected(UNet, config)
    return _convert(state, {k: unet_key_to_compvis(k, config) for k in expected}, expected, UNET_PREFIX, "U-Net")


def vae_from_compvis(state: dict[str, torch.Tensor], config: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """The VAE's tensors of a CompVis checkpoint, renamed (and 1×1 convs reshaped) for ``AutoencoderKL(config)``."""
    expected = _expected(AutoencoderKL, config)
    state = {k: v for k, v in state.items() if not k.startswith(VAE_PREFIX + "loss.")}  # training-only discriminator
    return _convert(state, {k: vae_key_to_compvis(k, config) for k in expected}, expected, VAE_PREFIX, "VAE")


def text_encoder_from_compvis(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP's text tower, named as in transformers' ``CLIPTextModel`` (5.x: ``embeddings.…``, ``encoder.…``;
    ``load_text_encoder`` adds 4.x's ``text_model.`` back where a model wants it)."""
    prefix = CLIP_PREFIX + "text_model."
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k.endswith("position_ids")}  # a buffer some files carry


def load_text_encoder(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load ``text_encoder_from_compvis``'s tensors into a ``CLIPTextModel`` of either transformers generation."""
    wants_prefix = next(iter(model.state_dict())).startswith("text_model.")
    state = {("text_model." + k if wants_prefix else k): v for k, v in state.items()}
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"the text encoder does not fit CLIP ViT-L/14's text tower: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}; minisd supports SD v1.x (CLIP ViT-L/14).")
    model.load_state_dict(state, strict=False)  # strict except the position_ids buffer, which some files omit
    return model


def to_compvis(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder_state: dict | None = None) -> dict:
    """minisd's models in SD's single-file layout (the VAE's attention projections as 1×1 convs, as LDM)."""
    out = {unet_key_to_compvis(k, unet.config): v for k, v in unet.state_dict().items()}
    for key, value in vae.state_dict().items():
        theirs = vae_key_to_compvis(key, vae.config)
        out[theirs] = value[:, :, None, None] if _is_vae_attention_projection(theirs) else value
    out |= {CLIP_PREFIX + "text_model." + k: v for k, v in (text_encoder_state or {}).items()}
    return {k: v.detach().contiguous() for k, v in out.items()}


def read_single_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A single-file SD checkpoint: ``.safetensors``, or ``.ckpt`` through ``torch.load(weights_only=True)``
    (tensors only: a pickle that would run code is refused)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from .checkpoints import read_tensors

        return read_tensors(path)
    if path.suffix in (".ckpt", ".pt", ".pth"):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        return loaded.get("state_dict", loaded)
    raise ValueError(f"{path.name}: expected a .safetensors or .ckpt single-file checkpoint, or a diffusers folder.")
