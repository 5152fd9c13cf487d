"""minisd's pipelines: diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline as oracles on the same weights
and text states, the three mechanisms in closed form, and clear errors for bad input.

Tolerance: the same U-Net and VAE maths in the same float32 order; measured differences are ≤ 1e-6 on
images in [0, 1]; we allow 1e-4."""

import pytest
import torch

from helpers import randomize
from minisd.convert import diffusers_scheduler, diffusers_unet_config, diffusers_vae_config
from minisd.nn import UNet, UNetConfig
from minisd.nn.vae import AutoencoderConfig, AutoencoderKL
from minisd.pipeline import StableDiffusionPipeline, blend_latents, classifier_free_guidance, img2img_start

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                  attention=(True, True), num_attention_heads=2, attention_head_dim=None, norm_num_groups=8,
                  cross_attention_dim=12)
VAE = AutoencoderConfig(block_out_channels=(16, 16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
                        scaling_factor=0.7)
TOL = dict(atol=1e-4, rtol=0)


class HashEncoder:
    """A stand-in text encoder: fixed random states per prompt (no model to load), (B, 5, 12)."""

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([torch.randn(5, 12, generator=torch.Generator().manual_seed(sum(map(ord, p)) + 1))
                            for p in prompts])



@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return StableDiffusionPipeline(randomize(UNet(UNET), 0, 0.1), randomize(AutoencoderKL(VAE), 1, 0.1), HashEncoder())


def photo() -> torch.Tensor:
    """A smooth (1, 3, 32, 32) image in [0, 1]."""
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    return torch.nn.functional.interpolate(coarse, size=32, mode="bilinear")


def mask() -> torch.Tensor:
    m = torch.zeros(1, 1, 32, 32)
    m[..., 8:24, 4:20] = 1.0  # repaint a rectangle
    return m


# ----------------------------------------------------------------------------- diffusers as the oracle


def diffusers_pipeline(kind: str, pipe: StableDiffusionPipeline, sampler: str):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DConditionModel(**diffusers_unet_config(pipe.unet.config)).eval()
    unet.load_state_dict(pipe.unet.state_dict())  # identity key names, strict
    vae = diffusers.AutoencoderKL(**diffusers_vae_config(pipe.vae.config)).eval()
    vae.load_state_dict(pipe.vae.state_dict())
    cls = {"text2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    theirs = cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=diffusers_scheduler(sampler, pipe.schedule),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return theirs


def run_both(pipe, kind: str, sampler: str, guidance_scale: float = 7.5, ours_only: dict | None = None, **kwargs):
    cond, uncond = pipe.encode_prompt(["a red letter K", "a blue letter 7"], 1, ["", "red"])
    common = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=6,
                  guidance_scale=guidance_scale, output_type="pt", **kwargs)
    theirs = diffusers_pipeline(kind, pipe, sampler)(**common, generator=torch.Generator().manual_seed(0)).images
    ours = pipe(**common, **(ours_only or {}), sampler=sampler, generator=torch.Generator().manual_seed(0),
                progress=False).images
    return ours, theirs


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_ancestral"])
def test_text_to_image_equals_diffusers(pipe, sampler):
    ours, theirs = run_both(pipe, "text2img", sampler, height=32, width=32)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_image_to_image_equals_diffusers(pipe, sampler, strength):
    ours, theirs = run_both(pipe, "img2img", sampler, image=photo(), strength=strength)
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_with_fixed_noise_equals_diffusers(pipe, sampler, strength):
    # diffusers reuses one noise for the known region at every step: minisd's blend_noise="fixed"
    ours, theirs = run_both(pipe, "inpaint", sampler, image=photo(), mask_image=mask(), strength=strength,
                            ours_only={"blend_noise": "fixed"})
    torch.testing.assert_close(ours, theirs, **TOL)


def test_the_measured_difference_from_diffusers_is_float_rounding(pipe):
    ours, theirs = run_both(pipe, "text2img", "ddim", height=32, width=32)
    print(f"text-to-image, DDIM, 6 steps: max |minisd − diffusers| = {(ours - theirs).abs().max().item():.2e}")
    assert (ours - theirs).abs().max() < 1e-5


# ----------------------------------------------------------------------------- the three mechanisms


def test_guidance_is_one_batched_call_and_follows_the_formula():
    calls = []

    def unet(x, t, encoder_hidden_states):
        calls.append(x.shape[0])
        return encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None] + 0 * x  # ε depends on the text only

    cond, uncond = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), 0.5)
    x, t = torch.zeros(2, 4, 8, 8), torch.tensor([10, 10])
    for w, expected in [(0.0, 0.5), (1.0, 2.0), (7.5, 0.5 + 7.5 * 1.5)]:
        calls.clear()
        eps = classifier_free_guidance(unet, cond, uncond, w)(x, t)
        torch.testing.assert_close(eps, torch.full_like(x, expected))
        assert calls == ([2] if w == 1 else [4])  # w = 1: the conditional half alone; else one call of 2B


def test_img2img_start_follows_diffusers_get_timesteps():
    assert [img2img_start(50, s) for s in (1.0, 0.8, 0.5, 0.01, 0.0)] == [0, 10, 25, 50, 50]
    assert img2img_start(10, 0.75) == 3  # int(7.5) = 7 steps are taken, from index 3


def test_blend_keeps_the_input_outside_the_mask_and_the_model_inside():
    latents, known = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    m = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    torch.testing.assert_close(blend_latents(latents, known, m), 1 - m.expand(1, 4, 2, 2))


def test_inpainting_keeps_the_known_region_of_the_latents_exactly(pipe):
    latents = pipe(prompt="a red letter K", image=photo(), mask_image=mask(), num_inference_steps=5,
                   output_type="latent", generator=torch.Generator().manual_seed(0), progress=False).images
    image_latents = pipe.vae.encode(photo() * 2 - 1).sample(torch.Generator().manual_seed(0)) * VAE.scaling_factor
    keep = mask()[..., ::4, ::4] == 0  # the latent mask: nearest neighbour, f = 4
    torch.testing.assert_close(latents[keep.expand_as(latents)], image_latents[keep.expand_as(latents)], rtol=0, atol=0)
    inside = ~keep.expand_as(latents)
    assert (latents[inside] - image_latents[inside]).abs().mean() > 0.1  # the masked part was regenerated


def test_fresh_and_fixed_blend_noise_differ_only_through_the_noise(pipe):
    common = dict(prompt="a red letter K", image=photo(), mask_image=mask(), num_inference_steps=5, output_type="pt",
                  progress=False)
    fresh = pipe(**common, blend_noise="fresh", generator=torch.Generator().manual_seed(0)).images
    fixed = pipe(**common, blend_noise="fixed", generator=torch.Generator().manual_seed(0)).images
    difference = (fresh - fixed).abs().mean().item()
    print(f"BLD fresh noise vs diffusers' fixed noise: mean |Δ| = {difference:.4f} on [0, 1] images")
    assert 0 < difference < 0.5


def test_strength_zero_returns_the_reconstruction_and_one_is_text_to_image(pipe):
    out = pipe(prompt="x", image=photo(), strength=0.0, output_type="pt", generator=torch.Generator().manual_seed(0),
               progress=False).images
    posterior = pipe.vae.encode(photo() * 2 - 1).sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ((pipe.vae.decode(posterior) + 1) / 2).clamp(0, 1), rtol=0, atol=1e-6)


def test_a_negative_prompt_takes_the_place_of_the_empty_prompt(pipe):
    def run(**kwargs):
        return pipe(num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(1), progress=False,
                    **kwargs).images

    cond = pipe.text_encoder.encode(["a letter K"])
    by_name = run(prompt="a letter K", negative_prompt="red")
    by_embeds = run(prompt_embeds=cond, negative_prompt_embeds=pipe.text_encoder.encode(["red"]))
    torch.testing.assert_close(by_name, by_embeds, rtol=0, atol=0)
    assert (by_name - run(prompt="a letter K")).abs().max() > 1e-3  # "" as the negative gives another image


def test_output_types_and_images_per_prompt(pipe):
    kwargs = dict(prompt=["a", "b"], num_inference_steps=2, num_images_per_prompt=3, progress=False)
    pil = pipe(**kwargs, output_type="pil").images
    assert len(pil) == 6 and pil[0].size == (32, 32) and pil[0].mode == "RGB"
    array = pipe(**kwargs, output_type="np").images
    assert array.shape == (6, 32, 32, 3) and 0 <= array.min() and array.max() <= 1


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 36}, r"height=36 must be a positive multiple of 8"),
    ({"width": 20}, r"width=20 must be a positive multiple of 8"),
    ({"image": "IMAGE", "strength": 1.5}, r"strength must be a number in \[0, 1\]"),
    ({"image": "IMAGE", "strength": -0.1}, r"strength must be a number in \[0, 1\]"),
    ({"image": "IMAGE", "mask_image": torch.zeros(1, 1, 16, 16)}, r"mask_image is 16×16 but image is 32×32"),
    ({"image": "IMAGE", "mask_image": torch.full((1, 1, 32, 32), 2.0)}, r"mask_image values must lie in \[0, 1\]"),
    ({"guidance_scale": -1.0}, r"guidance_scale must be a number ≥ 0"),
    ({"negative_prompt": ["a", "b", "c"]}, r"negative_prompt has 3 entries but prompt has 2"),
    ({"prompt": []}, r"prompt is an empty list"),
    ({"prompt": 7}, r"prompt must be a str or a list of str"),
    ({"num_inference_steps": 0}, r"num_inference_steps must be an int ≥ 1"),
    ({"image": torch.rand(1, 4, 32, 32)}, r"image must have 3 channel"),
    ({"image": torch.rand(1, 3, 32, 32) * 2 - 1}, r"image values must lie in \[0, 1\]"),
    ({"output_type": "jpeg"}, r"output_type='jpeg' is unknown"),
])
def test_bad_input_names_the_argument_and_the_range(pipe, kwargs, message):
    kwargs = {"prompt": ["a", "b"], "num_inference_steps": 2, "progress": False, **kwargs}
    if isinstance(kwargs.get("image"), str):
        kwargs["image"] = photo()
    with pytest.raises((ValueError, TypeError), match=message):
        pipe(**kwargs)


def test_a_pil_image_that_is_not_rgb_is_refused(pipe):
    from PIL import Image

    with pytest.raises(ValueError, match=r"mode 'RGBA'; convert it first with image.convert\('RGB'\)"):
        pipe(prompt="a", image=Image.new("RGBA", (32, 32)), num_inference_steps=2, progress=False)


def test_given_states_still_honour_the_negative_prompt_and_the_image_count(pipe):
    cond = pipe.text_encoder.encode(["a letter K"])
    kwargs = dict(num_inference_steps=3, output_type="pt", progress=False)
    by_embeds = pipe(prompt_embeds=cond, negative_prompt="red", generator=torch.Generator().manual_seed(1), **kwargs).images
    by_name = pipe(prompt="a letter K", negative_prompt="red", generator=torch.Generator().manual_seed(1), **kwargs).images
    torch.testing.assert_close(by_embeds, by_name, rtol=0, atol=0)
    assert pipe(prompt_embeds=cond, num_images_per_prompt=3, **kwargs).images.shape[0] == 3


def test_guidance_without_an_unconditional_half_is_refused_and_other_sizes_warn(pipe):
    with pytest.raises(ValueError, match=r"negative_prompt_embeds must have prompt_embeds' shape"):
        classifier_free_guidance(pipe.unet, torch.zeros(2, 5, 12), None, 7.5)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds must have prompt_embeds' shape \(2, 5, 12\)"):
        pipe(prompt_embeds=torch.zeros(2, 5, 12), negative_prompt_embeds=torch.zeros(3, 5, 12), num_inference_steps=2,
             progress=False)
    with pytest.warns(UserWarning, match="differs from the size the model was trained at"):
        pipe(prompt="a", height=64, width=64, num_inference_steps=1, progress=False)


def test_the_shipped_pipeline_runs_in_bfloat16_on_the_cpu():
    """Half precision end to end (bfloat16 on a CPU; float16 on a GPU): close to float32 on the same seed."""
    prompt = "a red letter K on a yellow background"
    kwargs = dict(num_inference_steps=10, output_type="pt", progress=False)
    half = StableDiffusionPipeline.from_pretrained(device="cpu", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.text_encoder.encode([prompt]).dtype == torch.bfloat16
    out = half(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    reference = StableDiffusionPipeline.from_pretrained(device="cpu")(prompt, generator=torch.Generator().manual_seed(0),
                                                                       **kwargs).images
    assert torch.isfinite(out).all() and (out - reference).abs().mean() < 0.02  # measured 0.003 on [0, 1] images
