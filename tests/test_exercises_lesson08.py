"""Lesson 08's checks: right answers pass in any correct form, stubs fall back, slips are named at the first
step that diverges."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_right_answer_passes_and_stub_falls_back

from minisd import exercises
from minisd.exercises import ExerciseError
from minisd.nn import Attention, BasicTransformerBlock, Transformer2DModel

pytestmark = pytest.mark.usefixtures("one_thread")


def stub(*args, **kwargs):
    raise NotImplementedError


# ----------------------------------------------------------------------------- multi-head attention


def attention(attn, hidden_states, encoder_hidden_states=None, *, scale=None, split="right", merge="right",
              softmax_dim=-1, kv_from_image=False, project_out=True):
    """A written-out Attention forward; the keyword arguments make the slips learners make."""
    context = hidden_states if encoder_hidden_states is None or kv_from_image else encoder_hidden_states
    B, N, _ = hidden_states.shape
    L, h, d = context.shape[1], attn.heads, attn.dim_head
    q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    splits = {"right": lambda t: t.reshape(B, t.shape[1], h, d).transpose(1, 2),
              "transposed": lambda t: t.reshape(B, t.shape[1], d, h).permute(0, 3, 1, 2),
              "no_transpose": lambda t: t.reshape(B, h, t.shape[1], d)}
    q, k, v = (splits[split](t) for t in (q, k, v))
    probs = (q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(d))).softmax(dim=softmax_dim)
    out = probs @ v  # (B, h, N, d)
    out = out.transpose(1, 2).reshape(B, N, h * d) if merge == "right" else out.reshape(B, N, h * d)
    return (attn.to_out[0](out) if project_out else out), probs


def learner_attention_einsum(attn, hidden_states, encoder_hidden_states=None):
    """Another correct form: weights used directly (no module calls for the hooks to see), einsum, sdpa."""
    c = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    h = attn.heads
    q = F.linear(hidden_states, attn.to_q.weight).unflatten(-1, (h, -1))  # (B, N, h, d)
    k = F.linear(c, attn.to_k.weight).unflatten(-1, (h, -1))
    v = F.linear(c, attn.to_v.weight).unflatten(-1, (h, -1))
    probs = torch.einsum("bnhd,blhd->bhnl", q, k).div(q.shape[-1] ** 0.5).softmax(-1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return F.linear(out.transpose(1, 2).flatten(2), attn.to_out[0].weight, attn.to_out[0].bias), probs


SLIPS = {
    "softmax over pixels": (dict(softmax_dim=-2), "softmax ran over the pixels"),
    "transposed head split": (dict(split="transposed"), "head split is transposed"),
    "head split without transpose": (dict(split="no_transpose"), re.escape("reshapes (B, n, h·d) straight to (B, h, n, d)")),
    "no scale": (dict(scale=1.0), "not scaled: divide them by √d"),
    "K and V from the image": (dict(kv_from_image=True), "to_k was applied to the wrong tokens"),
    "merge without transpose": (dict(merge="no_transpose"), re.escape("merge reshapes (B, h, N, d) straight to (B, N, h·d)")),
    "no output projection": (dict(project_out=False), "output projection is missing"),
}


@pytest.mark.parametrize("slip", SLIPS)
def test_attention_slips_are_named(slip):
    options, message = SLIPS[slip]
    with pytest.raises(ExerciseError, match=message):
        exercises.check_multi_head_attention(lambda a, x, c=None: attention(a, x, c, **options))


def test_attention_scale_by_the_full_width_and_a_swapped_return_are_named():
    with pytest.raises(ExerciseError, match="divided by √\\(h·d\\), the width of all heads"):
        exercises.check_multi_head_attention(lambda a, x, c=None: attention(a, x, c, scale=1 / math.sqrt(a.heads * a.dim_head)))
    with pytest.raises(ExerciseError, match="in this order"):
        exercises.check_multi_head_attention(lambda a, x, c=None: attention(a, x, c)[::-1])
    with pytest.raises(ExerciseError, match="should return a pair"):
        exercises.check_multi_head_attention(lambda a, x, c=None: attention(a, x, c)[0])


def test_attention_slips_without_hooks_are_still_named_from_the_output():
    """A learner who uses the weights directly: the merge slip is found in the output instead."""
    def merged_wrong(attn, x, c=None):
        out, probs = learner_attention_einsum(attn, x, c)
        heads = (probs @ F.linear(x if c is None else c, attn.to_v.weight).unflatten(-1, (attn.heads, -1)).transpose(1, 2))
        return F.linear(heads.reshape(out.shape[0], out.shape[1], -1), attn.to_out[0].weight, attn.to_out[0].bias), probs

    with pytest.raises(ExerciseError, match="the output is wrong: the merge reshapes"):
        exercises.check_multi_head_attention(merged_wrong)


# ----------------------------------------------------------------------------- transformer block


def block(b, x, c, *, residual1=True, norm1=True, order="sca", residual3=True):
    h = x
    for part in order:
        if part == "s":
            a = b.attn1(b.norm1(h) if norm1 else h)
            h = h + a if residual1 else a
        elif part == "c":
            h = h + b.attn2(b.norm2(h), encoder_hidden_states=c)
        else:
            f = b.ff(b.norm3(h))
            h = h + f if residual3 else f
    return h


def learner_block_with_names(b, hidden_states, encoder_hidden_states):
    """Another correct form: keyword arguments, different local names."""
    after_self = hidden_states + b.attn1(hidden_states=b.norm1(hidden_states))
    after_cross = after_self + b.attn2(hidden_states=b.norm2(after_self), encoder_hidden_states=encoder_hidden_states)
    return after_cross + b.ff(b.norm3(after_cross))


@pytest.mark.parametrize("options, message", [
    (dict(residual1=False), "residual around attn1 is missing"),
    (dict(norm1=False), "attn1 reads hidden_states un-normalised"),
    (dict(residual3=False), "residual around ff is missing"),
    (dict(order="csa"), "order attn2, attn1, ff"),
    (dict(order="sa"), "cross-attention attn2 is never called"),
], ids=["no residual 1", "no norm1", "no residual 3", "cross first", "no cross-attention"])
def test_block_slips_are_named(options, message):
    with pytest.raises(ExerciseError, match=message):
        exercises.check_transformer_block(lambda b, x, c: block(b, x, c, **options))


def test_block_wrong_norm_and_missing_text_are_named():
    def norm1_twice(b, x, c):
        h = x + b.attn1(b.norm1(x))
        h = h + b.attn2(b.norm1(h), c)
        return h + b.ff(b.norm3(h))

    with pytest.raises(ExerciseError, match="attn2 reads norm1\\(h\\).*attn2 goes with norm2"):
        exercises.check_transformer_block(norm1_twice)

    def self_attention_twice(b, x, c):
        h = x + b.attn1(b.norm1(x))
        h = h + b.attn2(b.norm2(h), None)
        return h + b.ff(b.norm3(h))

    with pytest.raises(ExerciseError, match="pass it encoder_hidden_states"):
        exercises.check_transformer_block(self_attention_twice)


# ----------------------------------------------------------------------------- spatial transformer


def spatial(t, x, c, *, to_tokens="right", back="right", residual=True, all_blocks=True):
    B, C, H, W = x.shape
    h = t.proj_in(t.norm(x))
    h = {"right": lambda m: m.flatten(2).transpose(1, 2),  # the same as permute + reshape
         "reshape": lambda m: m.reshape(B, H * W, C),
         "columns": lambda m: m.permute(0, 3, 2, 1).reshape(B, H * W, C)}[to_tokens](h)
    for block in t.transformer_blocks if all_blocks else t.transformer_blocks[:1]:
        h = block(h, c)
    h = h.transpose(1, 2).reshape(B, C, H, W) if back == "right" else h.reshape(B, C, H, W)
    out = t.proj_out(h)
    return x + out if residual else out


@pytest.mark.parametrize("options, message", [
    (dict(to_tokens="reshape"), "mixes channels and pixels: move C last first"),
    (dict(to_tokens="columns"), "ordered column by column"),
    (dict(back="reshape"), "reshape\\(B, C, H, W\\) straight from \\(B, N, C\\)"),
    (dict(residual=False), "the residual is missing"),
    (dict(all_blocks=False), "block 1 of 2 is never called: loop over"),
], ids=["reshape without permute", "column-major tokens", "back without permute", "no residual", "one block only"])
def test_spatial_transformer_slips_are_named(options, message):
    with pytest.raises(ExerciseError, match=message):
        exercises.check_spatial_transformer(lambda t, x, c: spatial(t, x, c, **options))


# ----------------------------------------------------------------------------- right answers and stubs


CHECKS = [
    (exercises.check_multi_head_attention, attention),
    (exercises.check_multi_head_attention, learner_attention_einsum),
    (exercises.check_transformer_block, block),
    (exercises.check_transformer_block, learner_block_with_names),
    (exercises.check_spatial_transformer, spatial),
]


@pytest.mark.parametrize("check, answer", CHECKS, ids=lambda f: f.__name__)
def test_right_answers_pass_and_stubs_fall_back_to_a_reference_that_passes(check, answer, capsys):
    assert_right_answer_passes_and_stub_falls_back(check, answer, capsys)


def test_the_references_are_the_library_modules():
    torch.manual_seed(0)
    attn = Attention(16, 8, heads=2, dim_head=8).eval()
    x, c = torch.randn(2, 6, 16), torch.randn(2, 3, 8)
    out, probs = exercises.check_multi_head_attention(stub)(attn, x, c)
    torch.testing.assert_close(out, attn(x, c))
    assert probs.shape == (2, 2, 6, 3) and torch.allclose(probs.sum(-1), torch.ones(2, 2, 6))
    b = BasicTransformerBlock(16, 2, 8).eval()
    torch.testing.assert_close(exercises.check_transformer_block(stub)(b, x, c), b(x, c))
    t = Transformer2DModel(16, 2, 8, norm_num_groups=4).eval()
    m = torch.randn(2, 16, 2, 3)
    torch.testing.assert_close(exercises.check_spatial_transformer(stub)(t, m, c), t(m, c))
