"""minisd.nn.attention and minisd.nn.transformer: the attention equation, recording attention maps,
and parity with diffusers' Attention, BasicTransformerBlock and Transformer2DModel."""

import math

import pytest
import torch

from helpers import randomize
from minisd.nn import Attention, AttentionStore, BasicTransformerBlock, SelfAttention2d, Transformer2DModel, UNet, UNetConfig
from minisd.nn.transformer import GEGLU, FeedForward

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 parity; measured differences are ≤ 1e-6



def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the equation


@pytest.mark.parametrize("cross", [False, True])
def test_attention_is_softmax_of_scaled_scores_times_values(cross):
    """Vaswani et al. 2017, eq. 1, written out head by head."""
    B, N, L, C, h = 2, 6, 5, 16, 4
    d = C // h
    layer = randomize(Attention(C, 12 if cross else None, heads=h, dim_head=d)).eval()
    x = _randn(B, N, C)
    context = _randn(B, L, 12, seed=2) if cross else x
    q, k, v = layer.to_q(x), layer.to_k(context), layer.to_v(context)  # (B, N | L, h·d)
    heads = []
    for i in range(h):
        s = slice(i * d, (i + 1) * d)
        probs = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), dim=-1)  # (B, N, L)
        heads.append(probs @ v[..., s])  # (B, N, d)
    expected = layer.to_out[0](torch.cat(heads, dim=-1))
    with torch.no_grad():
        got = layer(x, context if cross else None)
    assert got.shape == (B, N, C)
    torch.testing.assert_close(got, expected, **TOL)


def test_cross_attention_to_a_single_token_gives_every_pixel_that_tokens_value():
    """softmax over one key is 1, so the output cannot depend on the query: to_out(to_v(c))."""
    layer = randomize(Attention(8, cross_attention_dim=6, heads=2, dim_head=4)).eval()
    c = _randn(3, 1, 6)
    with torch.no_grad():
        out = layer(_randn(3, 10, 8), c)
        expected = layer.to_out[0](layer.to_v(c)).expand(3, 10, 8)
    torch.testing.assert_close(out, expected, **TOL)


def test_attention_rejects_text_states_in_the_wrong_layer():
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        Attention(8, heads=2, dim_head=4)(torch.randn(1, 4, 8), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        Attention(8, cross_attention_dim=6, heads=2, dim_head=4)(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="heads=0"):
        Attention(8, heads=0)


def test_self_attention_2d_is_groupnorm_attention_and_a_residual():
    layer = randomize(SelfAttention2d(16, num_heads=2, groups=4)).eval()
    x = _randn(2, 16, 3, 5)
    tokens = layer.group_norm(x).flatten(2).transpose(1, 2)  # (B, 15, 16)
    with torch.no_grad():
        expected = x + Attention.forward(layer, tokens).transpose(1, 2).reshape(x.shape)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_geglu_is_value_times_gelu_of_gate():
    layer = randomize(GEGLU(4, 3))
    x = _randn(2, 4)
    w, b = layer.proj.weight, layer.proj.bias
    expected = (x @ w[:3].T + b[:3]) * torch.nn.functional.gelu(x @ w[3:].T + b[3:])
    torch.testing.assert_close(layer(x), expected, **TOL)


# ----------------------------------------------------------------------------- attention maps


COND = UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                  attention=(True, True), num_attention_heads=2, norm_num_groups=8, cross_attention_dim=12)


def test_recording_attention_maps_changes_nothing_and_gives_probabilities():
    model = randomize(UNet(COND)).eval()
    x, t, text = _randn(2, 4, 8, 8), torch.tensor([10, 500]), _randn(2, 7, 12, seed=3)
    with torch.no_grad():
        plain = model(x, t, text)
        with AttentionStore(model) as store:
            recorded = model(x, t, text)
        after = model(x, t, text)
    assert torch.equal(plain, recorded) and torch.equal(plain, after)  # bit for bit
    # every Transformer2DModel has one cross-attention: 1 per down level, 1 mid, 2 per up level
    assert len(store.maps) == 1 + 1 + 1 + 2 + 2
    assert all(name.endswith("transformer_blocks.0.attn2") for name in store.maps)
    for name, calls in store.maps.items():
        (probs,) = calls  # one forward call recorded, none after the block
        N = 64 if name.startswith(("down_blocks.0", "up_blocks.1")) else 16  # 8×8 or 4×4 pixels
        assert probs.shape == (2, 2, N, 7)  # (B, heads, N, L)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, N))
    maps = store.token_maps(8, 8)
    assert maps.shape == (2, 7, 8, 8)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 8, 8))


def test_recorded_probabilities_are_the_ones_the_layer_uses():
    layer = randomize(Attention(8, cross_attention_dim=6, heads=2, dim_head=4)).eval()
    x, c = _randn(1, 5, 8), _randn(1, 3, 6, seed=2)
    with AttentionStore(layer) as store, torch.no_grad():
        out = layer(x, c)
    (probs,) = store.maps[""]
    v = layer.to_v(c).reshape(1, 3, 2, 4).transpose(1, 2)  # (B, h, L, d)
    mixed = (probs @ v).transpose(1, 2).reshape(1, 5, 8)  # (B, N, h·d)
    torch.testing.assert_close(layer.to_out[0](mixed), out, **TOL)


def test_self_attention_maps_are_recorded_on_request_and_misuse_is_explained():
    model = UNet(UNetConfig(sample_size=8, block_out_channels=(8, 16), attention=(False, True), attention_head_dim=8))
    with pytest.raises(ValueError, match="no cross-attention Attention layers"):
        AttentionStore(model)
    store = AttentionStore(model, cross_attention_only=False)
    with pytest.raises(ValueError, match="nothing recorded"):
        store.token_maps(8, 8)
    with store, torch.no_grad():
        model(torch.randn(1, 1, 8, 8), 3)
    assert {p.shape for calls in store.maps.values() for p in calls} == {(1, 2, 16, 16)}  # 4×4 pixels, 2 heads


# ----------------------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("cross_attention_dim, bias", [(None, False), (12, False), (None, True)])
def test_attention_equals_diffusers(cross_attention_dim, bias):
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention as TheirAttention

    theirs = randomize(TheirAttention(16, cross_attention_dim=cross_attention_dim, heads=4, dim_head=8, bias=bias)).eval()
    ours = Attention(16, cross_attention_dim, heads=4, dim_head=8, bias=bias).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: identical key names
    x = _randn(2, 10, 16)
    context = _randn(2, 5, 12, seed=2) if cross_attention_dim else None
    with torch.no_grad():
        torch.testing.assert_close(ours(x, context), theirs(x, context), **TOL)


def test_feed_forward_and_transformer_block_equal_diffusers():
    pytest.importorskip("diffusers")
    from diffusers.models.attention import BasicTransformerBlock as TheirBlock, FeedForward as TheirFF

    their_ff = randomize(TheirFF(16, activation_fn="geglu")).eval()
    ours_ff = FeedForward(16).eval()
    ours_ff.load_state_dict(their_ff.state_dict())
    x = _randn(2, 10, 16)
    torch.testing.assert_close(ours_ff(x), their_ff(x), **TOL)

    theirs = randomize(TheirBlock(16, 2, 8, cross_attention_dim=12, activation_fn="geglu")).eval()
    ours = BasicTransformerBlock(16, 2, cross_attention_dim=12).eval()
    ours.load_state_dict(theirs.state_dict())
    text = _randn(2, 5, 12, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, text), theirs(x, encoder_hidden_states=text), **TOL)


@pytest.mark.filterwarnings("ignore:.*Transformer2DModelOutput:FutureWarning")  # raised inside diffusers itself
@pytest.mark.parametrize("use_linear_projection", [False, True], ids=["conv-proj-sd1", "linear-proj-sd2"])
def test_transformer_2d_equals_diffusers(use_linear_projection):
    pytest.importorskip("diffusers")
    from diffusers import Transformer2DModel as TheirTransformer

    theirs = randomize(TheirTransformer(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=2, cross_attention_dim=12,
        norm_num_groups=4, use_linear_projection=use_linear_projection,
    )).eval()
    ours = Transformer2DModel(16, 2, 12, num_layers=2, norm_num_groups=4, use_linear_projection=use_linear_projection)
    ours.load_state_dict(theirs.state_dict())
    x, text = _randn(2, 16, 4, 6), _randn(2, 5, 12, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, text), theirs(x, encoder_hidden_states=text).sample, **TOL)
