"""The real thing: Stable Diffusion v1.x's own weights running in minisd's modules (lesson 13).

Three sources load into the same ``StableDiffusionPipeline``:

* an original single-file checkpoint (``v1-5-pruned-emaonly.safetensors`` or ``.ckpt``, CompVis key
  layout): ``convert`` renames its keys;
* a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``): the keys are already minisd's; the
  configs are read from each ``config.json``;
* a file minisd wrote itself with ``save_single_file`` (e.g. the course model in SD's layout): the
  same CompVis keys, plus the configs in the header, since the course model is not SD's shape.

What the U-Net predicts (``prediction_type``: ε for SD v1.x, v for SD 2.x 768-v) is not in its weights: a
diffusers folder says it in ``scheduler/scheduler_config.json`` (with the noise schedule), minisd's own files in
their header; for an original single file (whose YAML says ``parameterization: "v"``) pass it.

Nothing here downloads. ``MINISD_SD_WEIGHTS`` may point at a file or folder you have.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import convert
from .checkpoints import read_metadata, read_tensors, save_tensors
from .nn.unet import UNet, UNetConfig
from .nn.vae import AutoencoderConfig, AutoencoderKL
from .pipeline import StableDiffusionPipeline
from .prediction import check_prediction_type
from .schedules import NoiseSchedule
from .text import SD_MAX_LENGTH, CLIPTokenizer, TextEncoder

WEIGHTS_VARIABLE = "MINISD_SD_WEIGHTS"  # where lesson 13 looks for real weights
SD_V1_TEXT_CONFIG = dict(  # CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14; SD v1's text_encoder/config.json)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=1,
)


def clip_text_model(config: dict | None = None, device: str | torch.device | None = None):
    """transformers' ``CLIPTextModel`` with SD v1's config (123,060,480 parameters), random weights.

    On ``device="meta"`` it costs nothing (for counting); loading weights needs a real device, since the
    model's position-id buffer is not in its state dict."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device or "cpu"):
        return CLIPTextModel(CLIPTextConfig(**(config or SD_V1_TEXT_CONFIG))).eval().requires_grad_(False)


class CLIPTextEncoder:
    """SD v1's frozen text encoder: CLIP's tokeniser (77 tokens, padded with EOS) and the text tower's
    last hidden state, (B, 77, 768). SD v1 passes no attention mask: CLIP's causal mask keeps the
    padding from changing the prompt's own tokens."""

    hidden_size = SD_V1_TEXT_CONFIG["hidden_size"]

    def __init__(self, model, tokenizer: CLIPTokenizer | None = None) -> None:
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer or CLIPTokenizer()

    @torch.no_grad()
    def encode(self, prompt: str | list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompt, max_length=SD_MAX_LENGTH).input_ids.to(self.model.device)  # (B, 77)
        return self.model(input_ids=ids).last_hidden_state  # (B, 77, 768)


def unet_config_from_diffusers(d: dict) -> UNetConfig:
    """A diffusers ``unet/config.json`` as a UNetConfig; a ValueError for what SD v1/v2 U-Nets do not use."""
    unsupported = {k: d[k] for k in ("class_embed_type", "addition_embed_type", "num_class_embeds",
                                     "time_cond_proj_dim", "encoder_hid_dim") if d.get(k) is not None}
    if unsupported:
        raise ValueError(f"unet config uses {unsupported}: not SD v1.x/2.x's U-Net (SD XL or another model).")
    widths = tuple(d["block_out_channels"])
    heads = d.get("num_attention_heads") or d["attention_head_dim"]  # diffusers' attention_head_dim = h (legacy)
    heads = tuple(heads) if isinstance(heads, list) else (heads,) * len(widths)
    per_head = {w // h for w, h in zip(widths, heads)}
    fixed_heads = len(set(heads)) == 1
    return UNetConfig(
        in_channels=d["in_channels"], out_channels=d["out_channels"], sample_size=d["sample_size"],
        block_out_channels=widths, layers_per_block=d["layers_per_block"],
        attention=tuple(t.startswith("CrossAttn") for t in d["down_block_types"]),
        num_attention_heads=heads[0] if fixed_heads else None,
        attention_head_dim=None if fixed_heads else per_head.pop(),
        norm_num_groups=d.get("norm_num_groups", 32), norm_eps=d.get("norm_eps", 1e-5),
        cross_attention_dim=d["cross_attention_dim"], use_linear_projection=d.get("use_linear_projection", False))


def vae_config_from_diffusers(d: dict) -> AutoencoderConfig:
    """A diffusers ``vae/config.json`` as an AutoencoderConfig."""
    return AutoencoderConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
                             latent_channels=d["latent_channels"], block_out_channels=tuple(d["block_out_channels"]),
                             layers_per_block=d["layers_per_block"], norm_num_groups=d.get("norm_num_groups", 32),
                             sample_size=d.get("sample_size", 512), scaling_factor=d.get("scaling_factor", 0.18215))


def scheduler_from_diffusers(d: dict) -> tuple[NoiseSchedule, str]:
    """A diffusers ``scheduler/scheduler_config.json`` as (the training noise schedule, its ``prediction_type``).

    Missing keys take diffusers' scheduler defaults (DDPM's linear betas, "epsilon"); SD's configs set them all.
    A ValueError for what ``NoiseSchedule`` cannot build (explicit ``trained_betas``, zero-terminal-SNR rescaling).
    """
    unsupported = {k: d[k] for k in ("trained_betas", "rescale_betas_zero_snr") if d.get(k)}
    if unsupported:
        raise ValueError(f"scheduler config uses {unsupported}: minisd's NoiseSchedule builds betas from "
                         "num_train_timesteps, beta_start, beta_end and beta_schedule only.")
    schedule = NoiseSchedule(d.get("num_train_timesteps", 1000), d.get("beta_start", 0.0001), d.get("beta_end", 0.02),
                             d.get("beta_schedule", "linear"))
    return schedule, check_prediction_type(d.get("prediction_type", "epsilon"))


def _build(cls, config, state: dict[str, torch.Tensor], device, dtype):
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(state, assign=True)  # strict: every key and shape checked
    return model.to(device=device, dtype=dtype).eval()


def load_stable_diffusion(path: str | Path | None = None, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, unet_config: UNetConfig | None = None,
                          vae_config: AutoencoderConfig | None = None, text_config: dict | None = None,
                          prediction_type: str | None = None) -> StableDiffusionPipeline:
    """SD v1.x from a single file or a diffusers folder (default: ``$MINISD_SD_WEIGHTS``) as a minisd pipeline.

    A single file's configs come from its header (files minisd wrote), else the arguments, else SD v1.5's.
    ``prediction_type`` ("epsilon", "sample", "v_prediction") overrides what the folder's scheduler config or
    the file's header says; without either it is "epsilon" (SD v1.x).
    """
    if prediction_type is not None:
        check_prediction_type(prediction_type)
    raw = str(path) if path is not None else os.environ.get(WEIGHTS_VARIABLE, "")
    path = Path(raw)
    if not raw or not path.exists():  # Path("") is ".", which exists: test the string
        raise FileNotFoundError(f"no Stable Diffusion weights at {str(path)!r}: download SD v1.5 (e.g. "
                                "v1-5-pruned-emaonly.safetensors, or the diffusers folder stable-diffusion-v1-5) "
                                f"and set {WEIGHTS_VARIABLE} to its path.")
    if path.is_dir():
        return _load_diffusers_folder(path, device, dtype, prediction_type)
    state = convert.read_single_file(path)
    header = read_metadata(path) if path.suffix == ".safetensors" else {}
    if "unet_config" in header:
        unet_config, vae_config = UNetConfig.from_dict(header["unet_config"]), AutoencoderConfig.from_dict(header["vae_config"])
    unet_config = unet_config or UNetConfig.stable_diffusion_v1()
    vae_config = vae_config or AutoencoderConfig.stable_diffusion_v1()
    unet = _build(UNet, unet_config, convert.unet_from_compvis(state, unet_config), device, dtype)
    vae = _build(AutoencoderKL, vae_config, convert.vae_from_compvis(state, vae_config), device, dtype)
    if "text_encoder" in header:  # minisd's own export: the course's MiniLM encoder, not CLIP
        text_encoder = TextEncoder(header["text_encoder"]["max_length"], device=device, dtype=dtype)
    else:
        clip = convert.load_text_encoder(clip_text_model(text_config), convert.text_encoder_from_compvis(state))
        text_encoder = CLIPTextEncoder(clip.to(device=device, dtype=dtype))
    return StableDiffusionPipeline(unet, vae, text_encoder,
                                   prediction_type=prediction_type or header.get("prediction_type", "epsilon"))


def _load_diffusers_folder(path: Path, device, dtype, prediction_type: str | None) -> StableDiffusionPipeline:
    def part(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        folder = path / name
        files = sorted(folder.glob("*.safetensors"))
        full = [f for f in files if ".fp16." not in f.name]  # diffusers folders may hold an fp16 variant beside
        if not files:
            raise FileNotFoundError(f"{folder} has no .safetensors weights (minisd never unpickles .bin files).")
        state = {}
        for file in full or files:  # every shard of the chosen variant
            state |= read_tensors(file)
        return json.loads((folder / "config.json").read_text()), state

    unet_json, unet_state = part("unet")
    vae_json, vae_state = part("vae")
    text_json, text_state = part("text_encoder")
    unet = _build(UNet, unet_config_from_diffusers(unet_json), unet_state, device, dtype)
    vae = _build(AutoencoderKL, vae_config_from_diffusers(vae_json), vae_state, device, dtype)
    config = {k: text_json[k] for k in SD_V1_TEXT_CONFIG if k in text_json}
    text_state = {k.removeprefix("text_model."): v for k, v in text_state.items() if not k.endswith("position_ids")}
    clip = convert.load_text_encoder(clip_text_model(config), text_state)
    scheduler_json = path / "scheduler" / "scheduler_config.json"  # SD 2.x 768-v: "prediction_type": "v_prediction"
    schedule, folder_prediction_type = scheduler_from_diffusers(json.loads(scheduler_json.read_text())) \
        if scheduler_json.exists() else (None, "epsilon")
    return StableDiffusionPipeline(unet, vae, CLIPTextEncoder(clip.to(device=device, dtype=dtype)), schedule,
                                   prediction_type or folder_prediction_type)


def save_single_file(pipe: StableDiffusionPipeline, path: str | Path) -> None:
    """Write a pipeline's U-Net and VAE (and CLIP, if it has one) in SD's single-file layout, as safetensors.

    The header records the configs, the ``prediction_type`` and, for the course's MiniLM encoder, which encoder to rebuild, so that
    ``load_stable_diffusion`` reads the course model back; real SD tools read the same keys.
    """
    text_state, header = None, {"unet_config": pipe.unet.config.to_dict(), "vae_config": pipe.vae.config.to_dict(),
                                "prediction_type": pipe.prediction_type}
    if isinstance(pipe.text_encoder, CLIPTextEncoder):
        text_state = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.model.state_dict().items()}
    else:
        header["text_encoder"] = {"name": "all-MiniLM-L6-v2", "max_length": pipe.text_encoder.max_length}
    save_tensors(convert.to_compvis(pipe.unet, pipe.vae, text_state), path, header)
