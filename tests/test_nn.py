"""minisd.nn: shapes, error messages, and parity with diffusers (proof that the layout is SD's)."""

import pytest
import torch

from minisd.nn import (
    Downsample2D, ResnetBlock2D, SelfAttention2d, TimestepEmbedding, UNet, UNetConfig, Upsample2D,
    count_parameters, timestep_embedding,
)

import diffusers  # noqa: E402, F401  (a test extra: the parity tests below need it)

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = UNetConfig(
    in_channels=1, out_channels=1, sample_size=16, block_out_channels=(16, 32, 32), layers_per_block=2,
    attention=(False, True, True), attention_head_dim=8, norm_num_groups=8,
)


def _seeded_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (default inits leave biases and norms trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


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
    assert model.num_parameters == count_parameters(model) == sum(p.numel() for p in model.parameters())


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
    with pytest.raises(ValueError, match="lesson 08"):
        UNetConfig(cross_attention_dim=32)
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
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 500, 999])
    ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cin, cout, temb", [(16, 32, 64), (32, 32, 64), (16, 32, None)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_resnet_block_equals_diffusers(cin, cout, temb, eps):
    from diffusers.models.resnet import ResnetBlock2D as TheirResnet

    theirs = _seeded_(TheirResnet(in_channels=cin, out_channels=cout, temb_channels=temb, groups=8, eps=eps)).eval()
    ours = ResnetBlock2D(cin, cout, temb, groups=8, eps=eps).eval()
    ours.load_state_dict(theirs.state_dict())  # same names, same shapes: a plain copy
    x = torch.randn(2, cin, 8, 8)
    e = torch.randn(2, temb) if temb else None
    torch.testing.assert_close(ours(x, e), theirs(x, e), rtol=1e-5, atol=1e-5)


def _diffusers_unet(config: UNetConfig):
    """diffusers' UNet2DModel with the same layout: Attn*Block2D where config.attention is True."""
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
    theirs = _seeded_(_diffusers_unet(config)).eval()
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
    from diffusers.models.downsampling import Downsample2D as TheirDown
    from diffusers.models.upsampling import Upsample2D as TheirUp

    x = torch.randn(2, 8, 8, 8)
    their_down = _seeded_(TheirDown(8, use_conv=True, padding=padding, name="op")).eval()  # as in the U-Net/VAE blocks
    ours = Downsample2D(8, padding=padding)
    ours.load_state_dict(their_down.state_dict())
    torch.testing.assert_close(ours(x), their_down(x), rtol=1e-5, atol=1e-5)
    their_up = _seeded_(TheirUp(8, use_conv=True)).eval()
    ours = Upsample2D(8)
    ours.load_state_dict(their_up.state_dict())
    torch.testing.assert_close(ours(x), their_up(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 4])
def test_self_attention_equals_diffusers_attention(heads):
    """As in the VAE mid-block (heads = 1, ε = 1e-6) and UNet2DModel (heads = channels / head_dim)."""
    from diffusers.models.attention_processor import Attention

    channels = 32
    theirs = _seeded_(Attention(
        query_dim=channels, heads=heads, dim_head=channels // heads, eps=1e-6, norm_num_groups=8,
        residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True,
    )).eval()
    ours = SelfAttention2d(channels, num_heads=heads, groups=8, eps=1e-6).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, channels, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
