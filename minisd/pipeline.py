"""Stable Diffusion's pipelines: text-to-image with classifier-free guidance, image-to-image, inpainting.

    prompt ─ tokens ─ text encoder ─ (B, L, D) ┐
                                               ├─ sampler loop over the U-Net (guided) ─ latents ─ VAE decode ─ image
    noise (or an image's latents, noised) ─────┘

Three mechanisms, one function each (lessons 10–12 build them):

* ``classifier_free_guidance``: ε̃ = ε_u + w (ε_c − ε_u) (Ho & Salimans 2022, eq. 6), both halves in
  one batched U-Net call; a negative prompt takes the place of "" in the unconditional half.
* ``img2img_start``: SDEdit (Meng et al. 2021): noise the image's latents to the timestep where
  sampling starts, ``int(num_inference_steps · strength)`` steps before the end.
* ``blend_latents``: Blended Latent Diffusion (Avrahami et al. 2022, Alg. 1): after every step, keep the
  model's latents inside the mask and the input's latents, noised to the same level, outside it.

Argument names and defaults are diffusers' (``StableDiffusionPipeline``, ``…Img2ImgPipeline``,
``…InpaintPipeline``), which serve as oracles in tests/test_pipeline.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import samplers
from .checkpoints import verify_card
from .config import asset_path, get_device
from .image_processor import OUTPUT_TYPES, postprocess, preprocess_image, preprocess_mask
from .nn.unet import UNet
from .nn.vae import AutoencoderKL
from .prediction import check_prediction_type
from .schedules import NoiseSchedule
from .text import COURSE_MAX_LENGTH, TextEncoder, as_prompt_list

DEFAULT_MODEL = "t2i_glyphs.safetensors"  # the course's text-to-image U-Net in assets/checkpoints
BLEND_NOISE = ("fresh", "fixed")  # BLD draws new noise for the known region every step; diffusers reuses one


@dataclass
class PipelineOutput:
    """What a pipeline call returns (diffusers: ``StableDiffusionPipelineOutput``)."""

    images: object  # list of PIL images, or a tensor / array, per ``output_type``


def classifier_free_guidance(unet: UNet, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None,
                             guidance_scale: float) -> samplers.Model:
    """The guided model ε̃(x_t, t) = ε_u + w (ε_c − ε_u) as a sampler's ``model`` function.

    Args:
        prompt_embeds: c, (B, L, D) text states of the prompts.
        negative_prompt_embeds: (B, L, D) states of the negative prompts (or of ""), the unconditional half.
        guidance_scale: w. w = 1 is the conditional model alone: one U-Net call, no unconditional half.
            (diffusers also skips the half for w < 1, ignoring w; we keep the formula: w = 0 is ε_u.)
    """
    if guidance_scale == 1:
        return lambda x, t: unet(x, t, encoder_hidden_states=prompt_embeds)
    if negative_prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape:
        got = None if negative_prompt_embeds is None else tuple(negative_prompt_embeds.shape)
        raise ValueError(f"negative_prompt_embeds must have prompt_embeds' shape {tuple(prompt_embeds.shape)} for "
                         f"guidance_scale={guidance_scale} (the unconditional half); got {got}.")
    states = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, L, D): [uncond, cond], as diffusers

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=states)  # one call, (2B, C, h, w)
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    return guided


def img2img_start(num_inference_steps: int, strength: float) -> int:
    """Index into the inference timesteps where image-to-image starts (diffusers' ``get_timesteps``).

    ``strength`` = 1 starts at index 0 (the image noised to the first timestep, as diffusers); 0 takes no step at all (returns n).
    """
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return num_inference_steps - init_timestep


def blend_latents(latents: torch.Tensor, known_latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """m ⊙ latents + (1 − m) ⊙ known: the model's latents inside the mask, the input's outside (BLD, Alg. 1).

    latents, known_latents: (B, C, h, w) at the same noise level; mask: m, (B, 1, h, w), 1 = repaint.
    """
    return (1 - mask) * known_latents + mask * latents


def _negative_prompts(negative_prompt) -> list[str]:
    if isinstance(negative_prompt, str):
        return [negative_prompt]
    if isinstance(negative_prompt, (list, tuple)) and negative_prompt and all(isinstance(p, str) for p in negative_prompt):
        return list(negative_prompt)
    raise TypeError(f"negative_prompt must be None, a str or a non-empty list of str, got {negative_prompt!r:.80}.")


def noise_to_step(schedule: NoiseSchedule, latents: torch.Tensor, noise: torch.Tensor, i: int, timesteps: torch.Tensor,
                  sigmas: torch.Tensor, use_karras_sigmas: bool = False) -> torch.Tensor:
    """The latents noised to the level of sampling step i (``samplers.sampling_grid``'s timesteps, sigmas), on the
    DDPM scale: ``schedule.add_noise`` at timesteps[i]; with Karras σ's, whose timesteps are rounded labels,
    √ᾱ x_0 + √(1 - ᾱ) ε at ᾱ = 1 / (σ_i² + 1), the level the sampler itself assumes (diffusers' ``add_noise``)."""
    if not use_karras_sigmas:
        return schedule.add_noise(latents, noise, timesteps[i].expand(latents.shape[0]))
    alpha_bar = 1 / (sigmas[i].double() ** 2 + 1)
    return (alpha_bar.sqrt().float() * latents + (1 - alpha_bar).sqrt().float() * noise).to(latents.dtype)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) of 0/1 → latent resolution ``size`` by nearest neighbour, as diffusers does."""
    return F.interpolate(mask, size=size, mode="nearest")


class StableDiffusionPipeline:
    """Text-to-image, image-to-image (``image``, ``strength``) and inpainting (``image``, ``mask_image``).

    Args:
        unet: a conditional ``UNet`` (``cross_attention_dim`` = the text encoder's width).
        vae: the ``AutoencoderKL`` whose scaled latents the U-Net was trained on.
        text_encoder: turns prompts into (B, L, D) states: ``TextEncoder`` (course) or any object with
            ``encode(list[str]) -> tensor``.
        schedule: the training noise schedule (SD: scaled-linear, ``NoiseSchedule.stable_diffusion()``).
        prediction_type: what the U-Net predicts, ``"epsilon"`` (SD v1, the course model), ``"sample"`` or
            ``"v_prediction"`` (SD 2.x 768-v); diffusers keeps it in the scheduler's config.
    """

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder, schedule: NoiseSchedule | None = None,
                 prediction_type: str = "epsilon") -> None:
        if unet.config.cross_attention_dim is None:
            raise ValueError("unet has no cross-attention (UNetConfig.cross_attention_dim is None): it cannot read a prompt.")
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder
        self.schedule = schedule or NoiseSchedule.stable_diffusion()
        self.prediction_type = check_prediction_type(prediction_type)
        self.vae_scale_factor = vae.config.downsample_factor  # f: image side / latent side
        self.size_multiple = self.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32) -> "StableDiffusionPipeline":
        """The course's text-to-image model (default) or another U-Net file with a card naming its VAE (and,
        under ``schedule``, its ``prediction_type``; "epsilon" if absent)."""
        path = Path(path) if path is not None else asset_path("checkpoints", DEFAULT_MODEL)
        card = verify_card(path) or {}
        device = torch.device(device) if device is not None else get_device()
        vae_path = path.parent / card.get("autoencoder", {}).get("file", "vae_f4.safetensors")
        max_length = card.get("text_encoder", {}).get("max_length", COURSE_MAX_LENGTH)
        unet = UNet.from_pretrained(path, device).to(dtype)
        vae = AutoencoderKL.from_pretrained(vae_path, device).to(dtype)
        prediction_type = card.get("schedule", {}).get("prediction_type", "epsilon")
        return cls(unet, vae, TextEncoder(max_length, device=device, dtype=dtype), prediction_type=prediction_type)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode_prompt(self, prompt: str | list[str], num_images_per_prompt: int = 1,
                      negative_prompt: str | list[str] | None = None, guidance: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds), each (B · num_images_per_prompt, L, D); the second is
        None without guidance. A missing negative prompt is "" (the unconditional prompt of training)."""
        prompts = as_prompt_list(prompt)
        if not prompts:
            raise ValueError("prompt is an empty list; give at least one prompt.")
        negatives = [""] * len(prompts) if negative_prompt is None else _negative_prompts(negative_prompt)
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; "
                             "give one negative prompt, or one per prompt.")
        embeds = self.text_encoder.encode(prompts if not guidance else prompts + negatives)
        embeds = embeds.to(self.device, self.dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if not guidance:
            return embeds, None
        cond, uncond = embeds.chunk(2)  # prompts first, then negatives: one encoder call for both
        return cond, uncond

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 image=None, mask_image=None, strength: float | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None, sampler: str = "ddim",
                 eta: float = 0.0, output_type: str = "pil", callback: samplers.Callback | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 blend_noise: str = "fresh", progress: bool = True, use_karras_sigmas: bool = False) -> PipelineOutput:
        """Generate: text-to-image; with ``image``, image-to-image (``strength``, default 0.8); with
        ``image`` and ``mask_image``, inpainting (``strength``, default 1). ``blend_noise`` = "fixed"
        reuses one noise for the known region at every step, as diffusers; "fresh" draws new noise each
        step, as the BLD paper. ``prompt_embeds`` (and ``negative_prompt_embeds``) replace the prompts.
        ``use_karras_sigmas``: Karras σ spacing for euler, euler_ancestral, heun, dpmpp_2m (WebUI "… Karras")."""
        strength = (1.0 if mask_image is not None else 0.8) if strength is None else strength
        self._check_call(prompt, prompt_embeds, strength, num_inference_steps, guidance_scale, num_images_per_prompt,
                         output_type, blend_noise, image, mask_image)
        # 1. prompt → tokens → per-token states (the text encoder is frozen)
        guided = guidance_scale != 1
        if prompt_embeds is None:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(prompt, num_images_per_prompt, negative_prompt, guided)
        else:  # given states: repeat them per image, as diffusers does; a negative prompt still counts
            if guided and negative_prompt_embeds is None:
                negatives = [""] * prompt_embeds.shape[0] if negative_prompt is None else _negative_prompts(negative_prompt)
                if len(negatives) == 1:
                    negatives = negatives * prompt_embeds.shape[0]
                negative_prompt_embeds = self.encode_prompt(negatives, 1, None, False)[0]
            prompt_embeds = prompt_embeds.to(self.device, self.dtype).repeat_interleave(num_images_per_prompt, dim=0)
            if guided:
                negative_prompt_embeds = negative_prompt_embeds.to(self.device, self.dtype).repeat_interleave(
                    num_images_per_prompt, dim=0)
        model = classifier_free_guidance(self.unet, prompt_embeds, negative_prompt_embeds, guidance_scale)
        batch = prompt_embeds.shape[0]
        # 2. where sampling starts: pure noise, or the image's latents noised to timesteps[start]
        pixels = preprocess_image(image).to(self.device, self.dtype) if image is not None else None
        height, width = self._check_size(height, width, pixels, mask_image)
        shape = (batch, self.vae.config.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        image_latents = self._encode(pixels, batch, generator) if pixels is not None else None
        noise = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)  # CPU draw: same on any device
        timesteps, sigmas = samplers.sampling_grid(self.schedule, sampler, num_inference_steps, "leading", 1,
                                                   use_karras_sigmas)  # SD's spacing; checks the sampler's options
        start = img2img_start(num_inference_steps, strength) if image is not None else 0
        if start == num_inference_steps:  # strength ≈ 0: no step to take, the input comes back through the VAE
            return PipelineOutput(self._decode(image_latents, output_type))
        # img2img noises the image even at strength 1 (diffusers); text-to-image and inpainting at strength 1 start from noise
        pure_noise = image is None or (mask_image is not None and start == 0)
        x = noise if pure_noise else noise_to_step(self.schedule, image_latents, noise, start, timesteps, sigmas, use_karras_sigmas)
        # 3. the sampler's loop; inpainting pastes the known region back after every step
        if mask_image is not None:
            mask = latent_mask(preprocess_mask(mask_image).to(self.device, self.dtype), shape[-2:])
            callback = self._blend_callback(image_latents, mask, noise, (timesteps, sigmas, use_karras_sigmas), blend_noise,
                                            generator, callback)
        latents = samplers.sample(model, x, self.schedule, sampler, num_inference_steps, generator=generator, eta=eta,
                                  start_step=start, callback=callback, progress=progress,
                                  prediction_type=self.prediction_type, use_karras_sigmas=use_karras_sigmas)
        # 4. latents → pixels
        return PipelineOutput(self._decode(latents, output_type))

    def _encode(self, pixels: torch.Tensor, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        """Scaled latents of the input image(s), a posterior sample as diffusers draws it; repeated to ``batch``."""
        latents = self.vae.encode(pixels).sample(generator) * self.vae.config.scaling_factor
        if batch % latents.shape[0]:
            raise ValueError(f"image holds {latents.shape[0]} images for {batch} outputs; give 1 image, or one per output.")
        return latents.repeat(batch // latents.shape[0], 1, 1, 1)

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        return postprocess(self.vae.decode(latents / self.vae.config.scaling_factor), output_type)

    def _blend_callback(self, image_latents, mask, noise, grid, blend_noise, generator, user_callback):
        """The sampler callback of inpainting: after step i, known region = image latents noised to step i + 1's level.
        grid: (timesteps, sigmas, use_karras_sigmas), as ``noise_to_step`` takes them."""
        n = len(grid[0])

        def blend(i: int, t: int, x: torch.Tensor) -> torch.Tensor:
            if i + 1 < n:
                eps = noise if blend_noise == "fixed" else torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                known = noise_to_step(self.schedule, image_latents, eps, i + 1, *grid)
            else:  # after the last step the known region is the clean input
                known = image_latents
            x = blend_latents(x, known, mask)
            replaced = user_callback(i, t, x) if user_callback is not None else None
            return x if replaced is None else replaced

        return blend

    # ------------------------------------------------------------------------- input checks

    def _check_call(self, prompt, prompt_embeds, strength, num_inference_steps, guidance_scale,
                    num_images_per_prompt, output_type, blend_noise, image, mask_image) -> None:
        """ValueErrors that name the argument and the accepted range (nothing has run yet)."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompt and prompt_embeds.")
        if prompt_embeds is not None and (prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.unet.config.cross_attention_dim):
            raise ValueError(f"prompt_embeds must be (B, L, {self.unet.config.cross_attention_dim}) (cross_attention_dim), "
                             f"got {tuple(prompt_embeds.shape)}.")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be a number in [0, 1] (0: keep the image, 1: ignore it), got {strength!r}.")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int ≥ 1, got {num_inference_steps!r}.")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number ≥ 0 (1: no guidance; SD's default 7.5), got {guidance_scale!r}.")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an int ≥ 1, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is unknown; use one of {OUTPUT_TYPES}.")
        if blend_noise not in BLEND_NOISE:
            raise ValueError(f"blend_noise={blend_noise!r} is unknown; use one of {BLEND_NOISE}.")
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image: inpainting repaints the masked part of an image.")

    def _check_size(self, height, width, pixels, mask_image) -> tuple[int, int]:
        """(height, width): the image's size, else the arguments, else the training size; all checked."""
        default = self.unet.config.sample_size * self.vae_scale_factor
        if pixels is not None:
            size = tuple(pixels.shape[-2:])
            if (height or size[0], width or size[1]) != size:
                raise ValueError(f"height, width = {height}, {width} differ from the image's size {size}; leave them out.")
            height, width = size
        height, width = height or default, width or default
        if (height, width) != (default, default):
            warnings.warn(f"{height}×{width} differs from the size the model was trained at ({default}×{default}): "
                          "expect repeated or broken shapes (lesson 10 shows why).", stacklevel=3)
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % self.size_multiple:
                raise ValueError(f"{name}={value!r} must be a positive multiple of {self.size_multiple} (the VAE's factor "
                                 f"{self.vae_scale_factor} × the U-Net's downsampling); the model was trained at {default}.")
        if mask_image is not None:
            mask_size = tuple(preprocess_mask(mask_image).shape[-2:])
            if mask_size != (height, width):
                raise ValueError(f"mask_image is {mask_size[0]}×{mask_size[1]} but image is {height}×{width}; "
                                 "give a mask of the image's size.")
        return height, width
