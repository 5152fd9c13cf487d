"""Loading Stable Diffusion into minisd without the real weights: tiny SD-shaped models written as an
original single file and as a diffusers folder load into minisd's pipeline and draw what diffusers draws
from the same prompt (tokeniser, CLIP, U-Net, VAE, sampler); the course model survives SD's layout."""

import json

import pytest
import torch

from helpers import randomize
from minisd import convert, stable_diffusion
from minisd.nn import UNet, UNetConfig
from minisd.nn.vae import AutoencoderConfig, AutoencoderKL
from minisd.pipeline import StableDiffusionPipeline
from minisd.text import CLIPTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                  attention=(True, False), num_attention_heads=2, attention_head_dim=None, norm_num_groups=8,
                  cross_attention_dim=32)
VAE = AutoencoderConfig(block_out_channels=(16, 16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
                        scaling_factor=0.18215)
CLIP = dict(stable_diffusion.SD_V1_TEXT_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=32)
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry"



@pytest.fixture(scope="module")
def parts():
    clip = randomize(stable_diffusion.clip_text_model(CLIP), 2, 0.1, norms_near_one=True)
    return randomize(UNet(UNET), 0, 0.1, norms_near_one=True), randomize(AutoencoderKL(VAE), 1, 0.1, norms_near_one=True), clip


def draw(pipe, **kwargs):
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, output_type="pt",
                generator=torch.Generator().manual_seed(0), progress=False, **kwargs).images


def diffusers_draw(parts, tmp_path):
    """diffusers' own StableDiffusionPipeline on the same weights, with transformers' CLIPTokenizer."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTokenizer as TransformersCLIPTokenizer

    unet, vae, clip = parts
    theirs_unet = diffusers.UNet2DConditionModel(**convert.diffusers_unet_config(UNET)).eval()
    theirs_unet.load_state_dict(unet.state_dict())
    theirs_vae = diffusers.AutoencoderKL(**convert.diffusers_vae_config(VAE)).eval()
    theirs_vae.load_state_dict(vae.state_dict())
    ours = CLIPTokenizer()
    (tmp_path / "vocab.json").write_text(json.dumps(ours.encoder))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in ours.bpe_ranks))
    tokenizer = TransformersCLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),  # positionally
                                          model_max_length=77)
    pipe = diffusers.StableDiffusionPipeline(
        vae=theirs_vae, text_encoder=clip, tokenizer=tokenizer, unet=theirs_unet,
        scheduler=convert.diffusers_scheduler("ddim", StableDiffusionPipeline(unet, vae, None).schedule),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, output_type="pt", height=32, width=32,
                generator=torch.Generator().manual_seed(0)).images


def test_an_original_single_file_loads_and_draws_what_diffusers_draws(parts, tmp_path):
    unet, vae, clip = parts
    path = tmp_path / "sd-tiny.safetensors"
    from safetensors.torch import save_file

    text_state = {k.removeprefix("text_model."): v for k, v in clip.state_dict().items()}
    save_file(convert.to_compvis(unet, vae, text_state), str(path))  # no minisd header: like a real SD file
    pipe = stable_diffusion.load_stable_diffusion(path, unet_config=UNET, vae_config=VAE, text_config=CLIP)
    assert isinstance(pipe.text_encoder, stable_diffusion.CLIPTextEncoder)
    ours, theirs = draw(pipe), diffusers_draw(parts, tmp_path)
    print(f"single file → minisd vs diffusers: max |Δ| = {(ours - theirs).abs().max().item():.2e}")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_a_diffusers_folder_loads_and_draws_what_diffusers_draws(parts, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet, vae, clip = parts
    theirs_unet = diffusers.UNet2DConditionModel(**convert.diffusers_unet_config(UNET))
    theirs_unet.load_state_dict(unet.state_dict())
    theirs_unet.save_pretrained(tmp_path / "sd" / "unet")
    theirs_vae = diffusers.AutoencoderKL(**convert.diffusers_vae_config(VAE))
    theirs_vae.load_state_dict(vae.state_dict())
    theirs_vae.save_pretrained(tmp_path / "sd" / "vae")
    clip.save_pretrained(tmp_path / "sd" / "text_encoder")
    pipe = stable_diffusion.load_stable_diffusion(tmp_path / "sd")
    assert pipe.unet.config == UNET and pipe.vae.config == VAE
    torch.testing.assert_close(draw(pipe), diffusers_draw(parts, tmp_path), atol=1e-4, rtol=0)


def test_an_sd2_or_foreign_file_gets_a_clear_error(parts, tmp_path):
    unet, vae, _ = parts
    state = convert.to_compvis(unet, vae)
    state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(ValueError, match=r"looks like SD 2\.x"):
        stable_diffusion.load_stable_diffusion(tmp_path / "sd2.safetensors")  # SD v1.5's shapes expected
    with pytest.raises(FileNotFoundError, match="MINISD_SD_WEIGHTS"):
        stable_diffusion.load_stable_diffusion(tmp_path / "absent.safetensors")


def test_without_a_path_or_the_variable_the_message_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.delenv("MINISD_SD_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)  # "." exists: it must not be taken for a diffusers folder
    with pytest.raises(FileNotFoundError, match="download SD v1.5.*MINISD_SD_WEIGHTS"):
        stable_diffusion.load_stable_diffusion()


def test_sd_v1_text_tower_has_the_published_size():
    model = stable_diffusion.clip_text_model(device="meta")
    assert sum(p.numel() for p in model.parameters()) == 123_060_480


def test_the_course_model_survives_sd_single_file_layout(tmp_path):
    """Export the shipped text-to-image model in SD's layout, read it back: the same image, bit for bit."""
    pipe = StableDiffusionPipeline.from_pretrained(device="cpu")
    path = tmp_path / "course-in-sd-layout.safetensors"
    stable_diffusion.save_single_file(pipe, path)
    from minisd.checkpoints import read_tensors

    keys = read_tensors(path)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    back = stable_diffusion.load_stable_diffusion(path)
    kwargs = dict(prompt="a red letter K on a blue background", num_inference_steps=10, output_type="pt", progress=False)
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    after = back(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(before, after)
