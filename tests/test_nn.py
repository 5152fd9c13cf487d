"""minisd.nn: shapes, error messages, and parity with diffusers (proof that the layout is SD's).

The unconditional U-Net (UNet2DModel's layout) and the shared blocks; attention and the
text-conditioned U-Net have their own files (test_attention.py, test_unet_condition.py).
"""

import pytest
import torch

from helpers import randomize
from minisd.nn import (
    Downsample2D, ResnetBlock2D, SelfAttention2d, TimestepEmbedding, UNet, UNetConfig, Upsample2D,
    count_parameters, timestep_embedding,
)

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = UNetConfig(
    in_channels=1, out_channels=1, sample_size=16, block_out_channels=(16, 32, 32), layers_per_block=2,
    attention=(False, True, True), attention_head_dim=8, norm_num_groups=8,
)



# ----------------------------------------------------------------------------- shapes


def test_unet_output_has_the_input_shape_for_int_and_batched_timesteps():
    model = UNet(TINY).eval()
    x = torch.randn(3, 1, 16, 16)
    assert model(x, 10).shape == x.shape
    assert model(x, torch.tensor([0, 500, 999])).shape == x.shape
    assert model(torch.randn(1, 1, 32, 24), 3).shape == (1, 1, 32, 24)  # any size divisible by 4


def test_blocks_shapes():
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 64)
    assert ResnetBlock2D(16, 32, 64, groups=8)(x, temb).shape == (2, 32, 8, 8)
    assert ResnetBlock2D(16, 16, None, groups=8)(x).shape == (2, 16, 8, 8)
    assert Downsample2D(16)(x).shape == (2, 16, 4, 4)
    assert Downsample2D(16, padding=0)(x).shape == (2, 16, 4, 4)
    assert Upsample2D(16)(x).shape == (2, 16, 16, 16)
    assert SelfAttention2d(16, head_dim=8, groups=8)(x).shape == x.shape
    assert timestep_embedding(torch.tensor([1, 2, 3]), 33).shape == (3, 33)
    assert TimestepEmbedding(16, 64)(torch.randn(2, 16)).shape == (2, 64)


def test_time_embed_dim_is_four_times_the_first_width_as_in_sd():
    model = UNet(TINY)
    assert model.time_embedding.linear_1.weight.shape == (4 * 16, 16)


def _conv(cin: int, cout: int, k: int = 3) -> int:
    return k * k * cin * cout + cout  # weights + biases


def _resnet(cin: int, cout: int, temb: int) -> int:
    """norm1, conv1, time_emb_proj, norm2, conv2, and the 1×1 shortcut when the width changes."""
    return 2 * cin + _conv(cin, cout) + (temb * cout + cout) + 2 * cout + _conv(cout, cout) + (
        _conv(cin, cout, k=1) if cin != cout else 0)


def test_parameter_counts_match_hand_computed_formulas():
    assert count_parameters(torch.nn.Linear(3, 5)) == 3 * 5 + 5
    assert count_parameters(ResnetBlock2D(16, 32, 64, groups=8)) == _resnet(16, 32, 64) == 16_608
    assert count_parameters(SelfAttention2d(16, groups=8)) == 2 * 16 + 4 * (16 * 16 + 16)  # norm, q, k, v, out
    # one level of width 8 on 1 channel: conv_in, time MLP (8 → 32 → 32), one resnet down, mid
    # (resnet, attention, resnet), two resnets up (8 + 8 skip → 8), norm out, conv_out
    c, temb = 8, 32
    expected = (_conv(1, c) + (c * temb + temb) + (temb * temb + temb) + _resnet(c, c, temb)
                + 2 * _resnet(c, c, temb) + (2 * c + 4 * (c * c + c)) + 2 * _resnet(2 * c, c, temb)
                + 2 * c + _conv(c, 1))
    model = UNet(UNetConfig(block_out_channels=(c,), attention=(False,), attention_head_dim=8, sample_size=8))
    assert model.num_parameters == expected == 10_593


def test_config_round_trips_through_a_dict():
    assert UNetConfig.from_dict(TINY.to_dict()) == TINY


# ----------------------------------------------------------------------------- errors


def test_bad_configs_and_inputs_raise_value_errors_naming_the_field():
    with pytest.raises(ValueError, match=r"norm_num_groups=32"):
        UNetConfig(block_out_channels=(32, 48), attention=(False, True), norm_num_groups=32)
    with pytest.raises(ValueError, match=r"attention=.*one bool per level"):
        UNetConfig(block_out_channels=(32, 64), attention=(True,))
    with pytest.raises(ValueError, match=r"sample_size=20 .* 2\^\(levels - 1\) = 8"):
        UNetConfig(sample_size=20, block_out_channels=(8, 8, 8, 8), attention=(False,) * 4)
    with pytest.raises(ValueError, match="layers_per_block=0"):
        UNetConfig(layers_per_block=0)
    with pytest.raises(ValueError, match=r"attention_head_dim=32 must divide the width 16 .*mid block"):
        UNetConfig(block_out_channels=(16, 16), attention=(False, False), attention_head_dim=32, norm_num_groups=4)
    with pytest.raises(ValueError, match=r"use_linear_projection=True only applies with cross-attention"):
        UNetConfig(use_linear_projection=True)
    model = UNet(TINY)
    with pytest.raises(ValueError, match=r"divisible by 2\^\(levels - 1\) = 4"):
        model(torch.randn(1, 1, 18, 16), 0)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 3, 16, 16), 0)
    with pytest.raises(ValueError, match=r"timestep must be"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="groups=8"):
        ResnetBlock2D(12, 16, None, groups=8)


# ----------------------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("dim", [32, 33, 320])
@pytest.mark.parametrize("flip, shift", [(True, 0), (False, 1)])
def test_timestep_embedding_equals_diffusers(dim, flip, shift):
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 500, 999])
    ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cin, cout, temb", [(16, 32, 64), (32, 32, 64), (16, 32, None)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_resnet_block_equals_diffusers(cin, cout, temb, eps):
    pytest.importorskip("diffusers")
    from diffusers.models.resnet import ResnetBlock2D as TheirResnet

    theirs = randomize(TheirResnet(in_channels=cin, out_channels=cout, temb_channels=temb, groups=8, eps=eps)).eval()
    ours = ResnetBlock2D(cin, cout, temb, groups=8, eps=eps).eval()
    ours.load_state_dict(theirs.state_dict())  # same names, same shapes: a plain copy
    x = torch.randn(2, cin, 8, 8)
    e = torch.randn(2, temb) if temb else None
    torch.testing.assert_close(ours(x, e), theirs(x, e), rtol=1e-5, atol=1e-5)


def _diffusers_unet(config: UNetConfig):
    """diffusers' UNet2DModel with the same layout: Attn*Block2D where config.attention is True."""
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UNet2DModel(
        sample_size=config.sample_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in config.attention[::-1]),
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


@pytest.mark.parametrize("config", [
    TINY,
    UNetConfig(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, attention=(True, False),
               attention_head_dim=16, norm_num_groups=4),
], ids=["attention-at-two-lower-levels", "attention-at-the-top-level"])
def test_unet_equals_diffusers_unet2dmodel(config):
    theirs = randomize(_diffusers_unet(config)).eval()
    ours = UNet(config).eval()
    their_state = theirs.state_dict()
    # the same module names and shapes: the name mapping diffusers → minisd is the identity
    assert set(their_state) == set(ours.state_dict()), set(their_state) ^ set(ours.state_dict())
    ours.load_state_dict(their_state)
    assert count_parameters(ours) == count_parameters(theirs)

    x = torch.randn(2, 1, config.sample_size, config.sample_size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 871])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", [1, 0])
def test_resampling_equals_diffusers(padding):
    pytest.importorskip("diffusers")
    from diffusers.models.downsampling import Downsample2D as TheirDown
    from diffusers.models.upsampling import Upsample2D as TheirUp

    x = torch.randn(2, 8, 8, 8)
    their_down = randomize(TheirDown(8, use_conv=True, padding=padding, name="op")).eval()  # as in the U-Net/VAE blocks
    ours = Downsample2D(8, padding=padding)
    ours.load_state_dict(their_down.state_dict())
    torch.testing.assert_close(ours(x), their_down(x), rtol=1e-5, atol=1e-5)
    their_up = randomize(TheirUp(8, use_conv=True)).eval()
    ours = Upsample2D(8)
    ours.load_state_dict(their_up.state_dict())
    torch.testing.assert_close(ours(x), their_up(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 4])
def test_self_attention_equals_diffusers_attention(heads):
    """As in the VAE mid-block (heads = 1, ε = 1e-6) and UNet2DModel (heads = channels / head_dim)."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    channels = 32
    theirs = randomize(Attention(
        query_dim=channels, heads=heads, dim_head=channels // heads, eps=1e-6, norm_num_groups=8,
        residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True,
    )).eval()
    ours = SelfAttention2d(channels, num_heads=heads, groups=8, eps=1e-6).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, channels, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_self_attention_keeps_its_state_dict_keys():
    """Shipped checkpoints (VAE mid-block, ddpm_glyphs) hold exactly these names."""
    keys = set(SelfAttention2d(16, groups=8).state_dict())
    assert keys == {f"{m}.{p}" for m in ("group_norm", "to_q", "to_k", "to_v", "to_out.0") for p in ("weight", "bias")}


# ----------------------------------------------------------------------------- dtypes


def test_unet_runs_in_bfloat16_on_cpu_close_to_float32():
    """The timestep embedding is cast to the sample's dtype, so a bf16 model takes bf16 input end to end."""
    model = UNet(TINY).eval()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 700])
    with torch.no_grad():
        full = model(x, t)
        half = model.to(torch.bfloat16)(x.bfloat16(), t)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    # bf16 keeps 8 bits of mantissa (~0.4 % per operation); over a dozen layers a 5 % relative error is loose
    assert (half.float() - full).norm() / full.norm() < 0.05
