"""Training and scoring a text-to-image latent diffusion model on captioned glyphs (lesson 09).

Stable Diffusion's recipe, small (Rombach et al. 2022, §3.3 and eq. 3):

1. **Data, encoded once.** RGB glyphs go through the frozen course VAE (f = 4: 32×32 → 4×8×8),
   ``z_0 = scaling_factor · mean of q(z|x)``. The posterior *mean*: the course VAE's posterior σ is
   about 0.01 against a latent spread of about 2 (unscaled), so a sample would add 0.5 % noise, and
   it would be drawn once and frozen anyway (SD's script re-encodes, and so re-samples, every step).
   Captions go through the frozen text encoder once **per unique caption**: each image stores only
   an index into that table; index 0 is the empty prompt "".
2. **The loss**: ε-prediction MSE on SD's scaled-linear schedule, with 10 % of the captions
   replaced by "" (``text_to_image_loss``), so that the same network also learns ε_θ(x_t, t, ∅),
   the unconditional branch that classifier-free guidance needs.
3. **Sampling with classifier-free guidance** (Ho & Salimans 2022, eq. 6, in ε form):

       ε̂ = ε_θ(x_t, t, ∅) + w · (ε_θ(x_t, t, c) − ε_θ(x_t, t, ∅))

   batched as diffusers does: ``[uncond, cond]`` concatenated, one U-Net call, split.
4. **Scoring**: the shipped glyph classifier reads the decoded samples; prompt accuracy is the
   share whose character, ink colour and background colour are all the ones asked for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoints import read_metadata, read_tensors, save_tensors
from .data import CHARACTERS, COLOURS, GlyphDataset, _article, glyph_caption
from .metrics import glyph_accuracy
from .samplers import sample
from .schedules import NoiseSchedule

EMPTY_PROMPT = ""  # the unconditional prompt ∅; diffusers' default negative prompt
CAPTION_DROPOUT = 0.1  # SD v1.5 model card: "10 % dropping of the text-conditioning" for CFG
EVAL_NUM_INFERENCE_STEPS = 25  # DDIM, η = 0, in SD's 25-50 range; the shipped card also scores 50 at w = 7.5
DATA_FORMAT = "minisd.text_to_image.data/1"

# Wordings that the training captions ("a red letter K on an orange background") never use:
# other word order, synonyms, no article, no "letter"/"digit", commas.
REWORDINGS = (
    "the {kind} {char} in {fg}, {bg} background",
    "{char}, {fg} on {bg}",
    "{an_bg} {bg} background with {an_fg} {fg} {char} on it",
    "{fg} {char} on {bg}",
    "the character {char} written in {fg} over {bg}",
    "{char} drawn in {fg} ink on {an_bg} {bg} backdrop",
)


def reworded_caption(char: str, fg: str, bg: str, template: int = 0) -> str:
    """``REWORDINGS[template % 6]`` filled in, e.g. "the letter K in red, orange background"."""
    if char not in CHARACTERS or fg not in COLOURS or bg not in COLOURS:
        raise ValueError(f"({char!r}, {fg!r}, {bg!r}) is not a glyph: char from {CHARACTERS!r}, "
                         f"colours from {tuple(COLOURS)}.")
    kind = "digit" if char.isdigit() else "letter"
    return REWORDINGS[template % len(REWORDINGS)].format(
        kind=kind, char=char, fg=fg, bg=bg, an_fg=_article(fg), an_bg=_article(bg))


# ----------------------------------------------------------------------------- data, encoded once


@dataclass
class TextToImageData:
    """Latents and caption indices to train on, and the table of encoded captions they index.

    latents: z_0, (N, 4, 8, 8) float32, scaled by the VAE's scaling factor; caption_index: (N,)
    int64 into ``prompts``; prompts: U unique captions, ``prompts[0] == ""``; prompt_embeds: their
    encoder states, (U, L, 384); combinations: (char, fg, bg) of each image.
    """

    latents: torch.Tensor
    caption_index: torch.Tensor
    prompts: list[str]
    prompt_embeds: torch.Tensor
    combinations: list[tuple[str, str, str]]

    def train_data(self) -> dict[str, torch.Tensor]:
        """What ``Trainer`` indexes: {"latents": (N, 4, 8, 8), "caption_index": (N,)}."""
        return {"latents": self.latents, "caption_index": self.caption_index}

    def save(self, path: str | Path, metadata: dict) -> None:
        tensors = {"latents": self.latents, "caption_index": self.caption_index, "prompt_embeds": self.prompt_embeds}
        save_tensors(tensors, path, metadata | {"format": DATA_FORMAT, "prompts": self.prompts,
                                                "combinations": [list(c) for c in self.combinations]})

    @classmethod
    def load(cls, path: str | Path) -> tuple["TextToImageData", dict]:
        meta, t = read_metadata(path), read_tensors(path)
        if meta.get("format") != DATA_FORMAT:
            raise ValueError(f"{path} is not prepared text-to-image data (format {meta.get('format')!r}).")
        combinations = [tuple(c) for c in meta.pop("combinations")]
        return cls(t["latents"], t["caption_index"], meta.pop("prompts"), t["prompt_embeds"], combinations), meta


@torch.no_grad()
def prepare_data(dataset: GlyphDataset, vae, text_encoder, batch_size: int = 250) -> TextToImageData:
    """Encode ``dataset``'s RGB images with the VAE (posterior mean × scaling factor, module docstring)
    and each of its unique captions once with ``text_encoder`` (``minisd.text.TextEncoder``)."""
    if dataset.grayscale:
        raise ValueError("dataset is grey-scale; text-to-image trains on RGB glyphs: GlyphDataset(…, grayscale=False).")
    device = next(vae.parameters()).device
    latents = torch.cat([vae.encode_latents(x.to(device)).cpu() for x in dataset.images.split(batch_size)])
    prompts = [EMPTY_PROMPT, *sorted(set(dataset.captions))]
    index = {p: i for i, p in enumerate(prompts)}
    caption_index = torch.tensor([index[c] for c in dataset.captions])
    prompt_embeds = text_encoder.encode(prompts).float().cpu()  # (U, L, 384)
    combinations = [s.combination for s in dataset.specs]
    return TextToImageData(latents, caption_index, prompts, prompt_embeds, combinations)


# ----------------------------------------------------------------------------- the loss


def text_to_image_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator,
                       prompt_embeds: torch.Tensor, schedule: NoiseSchedule,
                       caption_dropout: float = CAPTION_DROPOUT, empty_index: int = 0) -> torch.Tensor:
    """L = E ‖ε − ε_θ(√ᾱ_t z_0 + √(1 − ᾱ_t) ε, t, c)‖² (LDM eq. 3), c = "" with probability ``caption_dropout``.

    Args:
        model: ε_θ, called as ``model(z_t, t, encoder_hidden_states=c)``.
        batch: {"latents": z_0 (B, 4, h, w), "caption_index": (B,) int64 into ``prompt_embeds``}.
        generator: draws, in this order, t (uniform over T), ε ~ N(0, I) and which captions drop.
        prompt_embeds: the encoded caption table (U, L, D); row ``empty_index`` is the empty prompt.
    """
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout={caption_dropout} must be in [0, 1].")
    latents, caption_index = batch["latents"], batch["caption_index"]
    B, device = latents.shape[0], latents.device
    t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=generator).to(device)  # (B,)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(device)  # ε, (B, 4, h, w)
    drop = torch.rand(B, generator=generator).to(device) < caption_dropout  # (B,) bool
    caption_index = torch.where(drop, torch.full_like(caption_index, empty_index), caption_index)
    states = prompt_embeds[caption_index.to(prompt_embeds.device)].to(device)  # c, (B, L, D)
    eps_pred = model(schedule.add_noise(latents, noise, t), t, encoder_hidden_states=states)
    return F.mse_loss(eps_pred, noise)


# ----------------------------------------------------------------------------- guided sampling


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """ε̂ = ε_u + w (ε_c − ε_u) (module docstring): w = 1 is the conditional model, w = 0 the unconditional."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def guided_model(unet: torch.nn.Module, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
                 guidance_scale: float):
    """ε̂(x_t, t) for a sampler: one U-Net call on ``[uncond, cond]`` (2B), split, combined.

    prompt_embeds, negative_prompt_embeds: c and ∅, (B, L, D). At w = 1 guidance changes nothing,
    so the model is called on c alone (as diffusers skips CFG for ``guidance_scale <= 1``).
    """
    if guidance_scale == 1.0:
        return lambda x_t, t: unet(x_t, t, encoder_hidden_states=prompt_embeds)
    context = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, L, D): [uncond, cond]

    def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_uncond, eps_cond = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=context).chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)

    return eps


@torch.no_grad()
def generate(unet: torch.nn.Module, vae, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
             guidance_scale: float = 7.5, num_inference_steps: int = EVAL_NUM_INFERENCE_STEPS,
             seed: int = 0, batch_size: int = 128, schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [-1, 1] for N prompts' states (N, L, D): DDIM (η = 0), CFG, VAE decode.

    negative_prompt_embeds: (1, L, D) for one negative (or "") prompt shared by all, or (N, L, D).
    The initial noise of all N is drawn first from ``torch.Generator().manual_seed(seed)``, so image i
    does not depend on ``batch_size``.
    """
    schedule = schedule or NoiseSchedule.stable_diffusion()
    device = next(unet.parameters()).device
    N = prompt_embeds.shape[0]
    negative = negative_prompt_embeds.expand(N, -1, -1) if negative_prompt_embeds.shape[0] == 1 else negative_prompt_embeds
    if negative.shape != prompt_embeds.shape:
        raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must be (1, L, D) or match "
                         f"prompt_embeds {tuple(prompt_embeds.shape)}.")
    c = unet.config
    noise = torch.randn(N, c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(seed))
    images = []
    for i in range(0, N, batch_size):
        c, u = (e[i:i + batch_size].to(device) for e in (prompt_embeds, negative))
        model = guided_model(unet, c, u, guidance_scale)
        latents = sample(model, noise[i:i + batch_size].to(device), schedule, "ddim", num_inference_steps, progress=False)
        images.append(vae.decode_latents(latents).float().cpu())
    return torch.cat(images)


# ----------------------------------------------------------------------------- evaluation


def evaluation_combinations(pool, n: int, seed: int) -> list[tuple[str, str, str]]:
    """n combinations from ``pool``: every one once in shuffled order, repeated while n is larger."""
    pool = sorted(set(pool))
    if not pool:
        raise ValueError("pool is empty: give at least one (char, fg, bg) combination.")
    order = pool[:]
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(n)] if n > len(order) else random.Random(seed).sample(pool, n)


@torch.no_grad()
def prompt_accuracy(unet, vae, text_encoder, classifier, combinations, prompts: list[str], guidance_scale: float,
                    num_inference_steps: int = EVAL_NUM_INFERENCE_STEPS, seed: int = 0,
                    embed_cache: dict | None = None) -> dict[str, float]:
    """Generate one image per prompt and score it against its (char, fg, bg): letter, fg, bg, all three.

    ``embed_cache`` (prompt → states) lets repeated calls skip the text encoder.
    """
    cache = {} if embed_cache is None else embed_cache
    missing = sorted({p for p in prompts if p not in cache} | ({EMPTY_PROMPT} - set(cache)))
    if missing:
        cache.update(zip(missing, text_encoder.encode(missing).float().cpu()))
    prompt_embeds = torch.stack([cache[p] for p in prompts])  # (N, L, D)
    images = generate(unet, vae, prompt_embeds, cache[EMPTY_PROMPT][None], guidance_scale, num_inference_steps, seed)
    chars, fg, bg = (list(x) for x in zip(*combinations))
    accuracy = glyph_accuracy(images, chars=chars, fg=fg, bg=bg, classifier=classifier)
    return {"letter": accuracy["char"], "fg": accuracy["fg"], "bg": accuracy["bg"], "all": accuracy["all"],
            "n": len(prompts), "guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps}


def seen_prompts(combinations) -> list[str]:
    return [glyph_caption(*c) for c in combinations]


def reworded_prompts(combinations) -> list[str]:
    """Prompt i uses template i % 6 of ``REWORDINGS``: deterministic, and every wording equally often."""
    return [reworded_caption(*c, template=i) for i, c in enumerate(combinations)]
