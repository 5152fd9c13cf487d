"""The text-conditioned U-Net (UNetConfig.cross_attention_dim set): shapes, errors, dtypes, and
parity with diffusers' UNet2DConditionModel, from a tiny config up to SD v1.5's full size (on meta)."""

import pytest
import torch

from helpers import randomize
from minisd.convert import diffusers_unet_config
from minisd.nn import Transformer2DModel, UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SD_V1_PARAMETERS = 859_520_964  # published size of SD v1.x's U-Net
SD_V2_PARAMETERS = 865_910_724  # SD 2.x's (diffusers' UNet2DConditionModel at stabilityai/stable-diffusion-2-1's config)

# the course's text-to-image shape at a smaller width: 4×8×8 latents, MiniLM-width text states
TINY = UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=2,
                  attention=(True, True, False), num_attention_heads=2, attention_head_dim=None, norm_num_groups=8,
                  cross_attention_dim=24)



def _inputs(config: UNetConfig, batch: int = 2, tokens: int = 7):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=g)
    text = torch.randn(batch, tokens, config.cross_attention_dim, generator=g)
    return x, torch.linspace(0, 999, batch).long(), text


# ----------------------------------------------------------------------------- shapes and layout


def test_output_has_the_sample_shape_and_depends_on_the_text():
    model = randomize(UNet(TINY)).eval()
    x, t, text = _inputs(TINY)
    with torch.no_grad():
        out = model(x, t, encoder_hidden_states=text)
        other = model(x, t, encoder_hidden_states=text.flip(0))
        fewer_tokens = model(x, t, encoder_hidden_states=text[:, :3])  # any number of tokens L
    assert out.shape == fewer_tokens.shape == x.shape
    assert not torch.allclose(out, other)  # swapping the captions changes the prediction
    torch.testing.assert_close(other.flip(0), model(x.flip(0), t.flip(0), text))  # … as swapping the samples does


def test_attention_levels_hold_spatial_transformers():
    model = UNet(TINY)
    kinds = [[type(a) for a in level.attentions] for level in model.down_blocks]
    assert kinds == [[Transformer2DModel] * 2, [Transformer2DModel] * 2, []]  # CrossAttnDownBlock2D ×2, DownBlock2D
    assert [len(level.attentions) for level in model.up_blocks] == [0, 3, 3]  # UpBlock2D, CrossAttnUpBlock2D ×2
    assert isinstance(model.mid_block.attentions[0], Transformer2DModel)  # UNetMidBlock2DCrossAttn
    assert model.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.weight.shape == (32, 24)  # K from text


def test_config_round_trips_and_unconditional_dicts_keep_their_old_fields():
    for config in (TINY, UNetConfig.stable_diffusion_v1(), UNetConfig.stable_diffusion_v2()):
        assert UNetConfig.from_dict(config.to_dict()) == config
    assert "use_linear_projection" in TINY.to_dict()
    assert "use_linear_projection" not in UNetConfig().to_dict()  # as written in the shipped cards


def test_heads_follow_either_the_count_or_the_channels_per_head():
    v1, v2 = UNetConfig.stable_diffusion_v1(), UNetConfig.stable_diffusion_v2()
    assert [v1.heads(c) for c in (320, 640, 1280)] == [8, 8, 8]  # 40, 80, 160 channels per head
    assert [v2.heads(c) for c in (320, 640, 1280)] == [5, 10, 20]  # 64 channels per head


# ----------------------------------------------------------------------------- errors


def test_bad_text_states_raise_value_errors_naming_the_argument():
    model = UNet(TINY)
    x, t, text = _inputs(TINY)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(B, L, cross_attention_dim=24\); got \(2, 7, 16\)"):
        model(x, t, encoder_hidden_states=text[..., :16])
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be .* got \(7, 24\)"):
        model(x, t, encoder_hidden_states=text[0])
    with pytest.raises(ValueError, match="encoder_hidden_states has batch 1, sample has 2"):
        model(x, t, encoder_hidden_states=text[:1])
    with pytest.raises(ValueError, match="encoder_hidden_states is required"):
        model(x, t)
    unconditional = UNet(UNetConfig(sample_size=8, block_out_channels=(8, 16), attention=(False, True), attention_head_dim=8))
    with pytest.raises(ValueError, match="encoder_hidden_states was given, but this U-Net has no cross-attention"):
        unconditional(torch.randn(1, 1, 8, 8), 0, encoder_hidden_states=torch.randn(1, 3, 8))


def test_bad_cross_attention_configs_raise_value_errors_naming_the_field():
    with pytest.raises(ValueError, match="transformer_layers_per_block=2 only applies with cross-attention"):
        UNetConfig(transformer_layers_per_block=2)
    with pytest.raises(ValueError, match="cross_attention_dim=0"):
        UNetConfig(cross_attention_dim=0)
    with pytest.raises(ValueError, match="transformer_layers_per_block=0"):
        UNetConfig(cross_attention_dim=8, transformer_layers_per_block=0)
    with pytest.raises(ValueError, match="num_attention_heads=3 must divide the width 16"):
        UNetConfig(block_out_channels=(16, 32), attention=(True, False), num_attention_heads=3, cross_attention_dim=8)


# ----------------------------------------------------------------------------- dtypes


def test_runs_in_bfloat16_on_cpu_close_to_float32():
    model = UNet(TINY).eval()  # default init: the scale a real model starts training at
    x, t, text = _inputs(TINY)
    with torch.no_grad():
        full = model(x, t, text)
        half = model.to(torch.bfloat16)(x.bfloat16(), t, text.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    # bf16 keeps 8 bits of mantissa (~0.4 % per operation); over ~20 layers a 5 % relative error is loose
    assert (half.float() - full).norm() / full.norm() < 0.05


# ----------------------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("config", [
    TINY,
    UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=1,
               attention=(False, True, True), attention_head_dim=8, norm_num_groups=4, cross_attention_dim=12,
               use_linear_projection=True, transformer_layers_per_block=2),
], ids=["sd1-shaped", "sd2-shaped-two-transformer-layers"])
def test_unet_equals_diffusers_unet2dconditionmodel(config):
    diffusers = pytest.importorskip("diffusers")
    theirs = randomize(diffusers.UNet2DConditionModel(**diffusers_unet_config(config))).eval()
    ours = UNet(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # identity key names, same shapes
    x, t, text = _inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, text), theirs(x, t, encoder_hidden_states=text).sample,
                                   rtol=1e-5, atol=1e-5)  # measured: identical to the last bit on this CPU


@pytest.mark.parametrize("name, size", [("stable_diffusion_v1", SD_V1_PARAMETERS), ("stable_diffusion_v2", SD_V2_PARAMETERS)])
def test_stable_diffusion_configs_have_diffusers_keys_shapes_and_size(name, size):
    """Full size on the meta device: shapes without memory, so it takes seconds."""
    diffusers = pytest.importorskip("diffusers")
    config = getattr(UNetConfig, name)()
    with torch.device("meta"):
        ours = UNet(config)
        theirs = diffusers.UNet2DConditionModel(**diffusers_unet_config(config))
    assert ours.num_parameters == size
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
