"""Stable Diffusion's own (CompVis) checkpoint layout: minisd's key maps against diffusers' single-file
conversion functions, round trips, and what a checkpoint that is not SD v1.x is told."""

import pytest
import torch

from helpers import randomize
from minisd import convert
from minisd.nn import UNet, UNetConfig
from minisd.nn.vae import AutoencoderConfig, AutoencoderKL

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = UNetConfig(in_channels=4, out_channels=4, sample_size=16, block_out_channels=(16, 32, 32, 32), layers_per_block=2,
                  attention=(True, True, True, False), num_attention_heads=2, attention_head_dim=None,
                  norm_num_groups=8, cross_attention_dim=24)  # SD v1's layout at tiny widths
VAE = AutoencoderConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=8, sample_size=32,
                        scaling_factor=0.18215)



@pytest.fixture(scope="module")
def models():
    return randomize(UNet(UNET), 0, 1.0), randomize(AutoencoderKL(VAE), 1, 1.0)


def test_compvis_keys_are_sd_v1_names(models):
    unet, vae = models
    state = convert.to_compvis(unet, vae)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in state
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in state  # the first downsampler
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in state  # an upsampler after a plain level
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in state  # … and after a transformer
    assert "first_stage_model.decoder.up.3.block.0.conv1.weight" in state  # LDM numbers decoder levels from the top
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert len(state) == len(unet.state_dict()) + len(vae.state_dict())


def test_diffusers_own_conversion_reads_our_compvis_file_back_to_the_same_tensors(models):
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    unet, vae = models
    state = convert.to_compvis(unet, vae)
    theirs_unet = single_file.convert_ldm_unet_checkpoint(state, convert.diffusers_unet_config(UNET))
    theirs_vae = single_file.convert_ldm_vae_checkpoint(state, convert.diffusers_vae_config(VAE))
    for ours, theirs in ((unet.state_dict(), theirs_unet), (vae.state_dict(), theirs_vae)):
        assert set(theirs) == set(ours)
        for key, value in ours.items():
            assert torch.equal(theirs[key].reshape(value.shape), value), key


def test_minisd_reads_a_compvis_file_back_key_by_key(models):
    unet, vae = models
    state = convert.to_compvis(unet, vae, {"final_layer_norm.weight": torch.ones(3)})
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state
    for ours, back in ((unet.state_dict(), convert.unet_from_compvis(state, UNET)),
                       (vae.state_dict(), convert.vae_from_compvis(state, VAE))):
        assert set(back) == set(ours) and all(torch.equal(back[k], v) for k, v in ours.items())
    text = convert.text_encoder_from_compvis(state)
    assert list(text) == ["final_layer_norm.weight"] and torch.equal(text["final_layer_norm.weight"], torch.ones(3))


def test_other_checkpoints_are_named_in_the_error(models):
    unet, vae = models
    state = convert.to_compvis(unet, vae)
    sd2 = dict(state)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    sd2[key] = torch.zeros(16, 1024)
    with pytest.raises(ValueError, match=r"looks like SD 2\.x.*minisd supports SD v1\.x.*wrong shapes"):
        convert.unet_from_compvis(sd2, UNET)
    xl = dict(state) | {"conditioner.embedders.0.transformer.x": torch.zeros(1)}
    assert convert.describe_checkpoint(xl).startswith("SD XL")
    inpainting = dict(state) | {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(16, 9, 3, 3)}
    assert "9 input channels" in convert.describe_checkpoint(inpainting)
    missing = {k: v for k, v in state.items() if "middle_block.1" not in k}
    with pytest.raises(ValueError, match=r"missing \(\d+\): model\.diffusion_model\.middle_block\.1"):
        convert.unet_from_compvis(missing, UNET)
    assert convert.describe_checkpoint({"x": torch.zeros(1)}).startswith("not a Stable Diffusion checkpoint")


def test_a_ckpt_is_read_with_weights_only(tmp_path, models):
    unet, vae = models
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": convert.to_compvis(unet, vae)}, path)
    assert set(convert.read_single_file(path)) == set(convert.to_compvis(unet, vae))
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    path.write_bytes(pickle.dumps({"state_dict": Boom()}))
    with pytest.raises(pickle.UnpicklingError):
        convert.read_single_file(path)
