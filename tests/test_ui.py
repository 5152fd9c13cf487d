"""The prompt UI without a browser: a tiny random pipeline, widgets set in code, the button pressed."""

import io

import pytest
import torch
from PIL import Image

from helpers import TINY_UNET, TINY_VAE, HashEncoder

from minisd.nn import UNet
from minisd.nn.vae import AutoencoderKL
from minisd.pipeline import StableDiffusionPipeline
from minisd.ui import WEBUI_PARAMETERS, PromptUI, to_png, webui_table

pytestmark = pytest.mark.usefixtures("one_thread")

UNET, VAE = TINY_UNET, TINY_VAE


class RecordingPipeline(StableDiffusionPipeline):
    """The real pipeline, remembering the arguments of every call and how many steps it reported."""

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return super().__call__(**kwargs)


@pytest.fixture()
def pipe() -> RecordingPipeline:
    torch.manual_seed(0)
    pipe = RecordingPipeline(UNet(UNET).eval(), AutoencoderKL(VAE).eval(), HashEncoder())
    pipe.calls = []
    return pipe


def shown(ui: PromptUI) -> Image.Image:
    return Image.open(io.BytesIO(bytes(ui.image.value)))


def test_pressing_generate_shows_the_image_that_the_settings_ask_for(pipe):
    ui = PromptUI(pipe)
    ui.prompt.value, ui.negative_prompt.value = "a blue letter Q", "red"
    ui.num_inference_steps.value, ui.guidance_scale.value, ui.seed.value, ui.sampler.value = 3, 4.5, 1234, "euler"
    assert len(ui.image.value) == 0
    ui.button.click()
    call = pipe.calls[-1]
    assert (call["num_inference_steps"], call["guidance_scale"], call["sampler"]) == (3, 4.5, "euler")
    assert (call["prompt"], call["negative_prompt"]) == ("a blue letter Q", "red")
    assert ui.progress.value == ui.progress.max == 3  # the callback moved the bar once per step
    image = shown(ui)
    assert image.format == "PNG" and image.height >= 32 * 4 and len(ui.images) == 1
    # the seed reached the pipeline: the same call with that seed draws the same picture
    again = pipe(prompt="a blue letter Q", negative_prompt="red", num_inference_steps=3, guidance_scale=4.5,
                 sampler="euler", generator=torch.Generator().manual_seed(1234), progress=False).images[0]
    assert list(again.getdata()) == list(ui.images[0].getdata())
    assert "seed 1234" in ui.status.value


def test_another_seed_another_image_and_the_same_seed_the_same(pipe):
    ui = PromptUI(pipe, num_inference_steps=2)
    first = bytes(ui.generate() and ui.image.value)
    ui.seed.value = 7
    ui.button.click()
    assert bytes(ui.image.value) != first and ui.last_kwargs["seed"] == 7
    ui.seed.value = 0
    ui.button.click()
    assert bytes(ui.image.value) == first


def test_size_batch_and_random_seed_reach_the_pipeline(pipe):
    ui = PromptUI(pipe, num_inference_steps=2)
    assert ui.width.value == ui.height.value == 32 and 64 in ui.width.options
    ui.width.value, ui.height.value, ui.num_images_per_prompt.value, ui.seed.value = 64, 32, 3, -1
    ui.button.click()
    assert [im.size for im in ui.images] == [(64, 32)] * 3
    assert pipe.calls[-1]["width"] == 64 and pipe.calls[-1]["num_images_per_prompt"] == 3
    assert 0 <= ui.last_kwargs["seed"] <= 2**31 - 1  # −1 drew a seed, and the status names it
    assert f"seed {ui.last_kwargs['seed']}" in ui.status.value
    assert shown(ui).width > 3 * shown(ui).height  # three wide images side by side


def test_bad_settings_are_reported_in_the_status_and_the_last_image_stays(pipe):
    ui = PromptUI(pipe, num_inference_steps=2)
    ui.button.click()
    before = bytes(ui.image.value)
    ui.height.options = (32, 36)  # a size the pipeline refuses (not a multiple of 8)
    ui.height.value = 36
    assert ui.generate() == []
    assert "height=36 must be a positive multiple of 8" in ui.status.value and bytes(ui.image.value) == before
    assert not ui.button.disabled


def test_the_webui_table_names_every_parameter_once():
    table = webui_table()
    assert table.count("\n") == len(WEBUI_PARAMETERS) + 1
    for name in ("Prompt", "Negative prompt", "Sampling steps", "Sampling method", "CFG Scale", "Seed",
                 "Width / Height", "Batch size", "Batch count", "Denoising strength"):
        assert f"| {name} |" in table


def test_to_png_enlarges_without_smoothing():
    im = Image.new("RGB", (2, 2), "black")
    im.putpixel((0, 0), (255, 0, 0))
    big = Image.open(io.BytesIO(to_png([im], height=8))).convert("RGB")
    assert big.size == (8, 8) and set(big.getdata()) == {(255, 0, 0), (0, 0, 0)}


def test_the_karras_box_reaches_the_pipeline_and_bad_pairs_are_reported(pipe):
    ui = PromptUI(pipe, num_inference_steps=3, sampler="dpmpp_2m")
    assert ui.use_karras_sigmas.value is False
    ui.button.click()
    plain = bytes(ui.image.value)
    assert pipe.calls[-1]["use_karras_sigmas"] is False and "dpmpp_2m," in ui.status.value
    ui.use_karras_sigmas.value = True  # the WebUI's "DPM++ 2M Karras"
    ui.button.click()
    assert pipe.calls[-1]["use_karras_sigmas"] is True and "dpmpp_2m Karras" in ui.status.value
    karras = bytes(ui.image.value)
    assert karras != plain
    ui.sampler.value = "ddim"  # DDIM steps between training timesteps: the pipeline refuses, the UI says why
    assert ui.generate() == []
    assert "use_karras_sigmas=True applies to samplers" in ui.status.value and bytes(ui.image.value) == karras
    assert "| Schedule type: Karras" in webui_table() and "use_karras_sigmas=True" in webui_table()
