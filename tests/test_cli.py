"""`python -m minisd generate|img2img|inpaint`, run end to end on a tiny model written to a folder with its card."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from minisd import checkpoints
from minisd.nn import UNet, UNetConfig
from minisd.nn.vae import AutoencoderConfig, AutoencoderKL

UNET = UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                  attention=(True, True), num_attention_heads=2, attention_head_dim=None, norm_num_groups=8,
                  cross_attention_dim=384)
VAE = AutoencoderConfig(block_out_channels=(16, 16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    checkpoints.save_model(AutoencoderKL(VAE), folder / "vae.safetensors")
    checkpoints.save_model(UNet(UNET), folder / "unet.safetensors")
    checkpoints.write_card(folder / "unet.safetensors", {"autoencoder": {"file": "vae.safetensors"},
                                                         "text_encoder": {"max_length": 16}})
    return folder / "unet.safetensors"


def minisd(*args: str, cwd) -> subprocess.CompletedProcess:
    env = os.environ | {"MINISD_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "minisd", *args], cwd=cwd, capture_output=True, text=True, env=env)


def test_help_lists_the_three_commands(tmp_path):
    result = minisd("--help", cwd=tmp_path)
    assert result.returncode == 0 and all(c in result.stdout for c in ("generate", "img2img", "inpaint"))


def test_generate_img2img_and_inpaint_write_pngs_reproducibly(model, tmp_path):
    common = ["--model", str(model), "--steps", "3", "--quiet"]
    result = minisd("generate", "--prompt", "a red letter K", "--seed", "3", "-o", "k.png", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    k = Image.open(tmp_path / "k.png")
    assert k.size == (32, 32) and k.mode == "RGB"

    from minisd.pipeline import StableDiffusionPipeline  # the same call in this process: the same pixels

    pipe = StableDiffusionPipeline.from_pretrained(model, device="cpu")
    same = pipe(prompt="a red letter K", num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                progress=False).images[0]
    assert np.array_equal(np.asarray(same), np.asarray(k))

    Image.fromarray(np.where(np.arange(32)[None, :] < 16, 255, 0).astype(np.uint8).repeat(32, 0)).save(tmp_path / "m.png")
    result = minisd("img2img", "--image", "k.png", "--prompt", "a blue letter K", "--strength", "0.5", "-o", "b.png",
                    *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = minisd("inpaint", "--image", "k.png", "--mask", "m.png", "--prompt", "a blue letter K",
                    "--num-images", "2", "-o", "in.png", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "b.png").size == (32, 32)
    assert {p.name for p in tmp_path.glob("in-*.png")} == {"in-0.png", "in-1.png"}


def test_bad_input_exits_with_a_message_and_writes_nothing(model, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    result = minisd("img2img", "--image", "x.png", "--prompt", "a", "--strength", "1.5", "-o", "out.png",
                    "--model", str(model), "--quiet", cwd=tmp_path)
    assert result.returncode == 2 and "strength must be a number in [0, 1]" in result.stderr
    assert not (tmp_path / "out.png").exists()
