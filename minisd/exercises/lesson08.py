"""Checks for lesson 08: the cross-attention U-Net.

Each answer is the forward pass of one of minisd's modules written out by hand: ``Attention``,
``BasicTransformerBlock``, ``Transformer2DModel``. The check hands the learner's function such a
module with random weights, records with hooks what each sub-module received (projections, norms,
attention layers, transformer blocks) and compares step by step with the module's own forward, so
that a wrong answer is named at the first step that diverges ("to_k was applied to the wrong
tokens", "the softmax ran over the pixels", "the residual around attn1 is missing").
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..nn.attention import Attention
from ..nn.transformer import BasicTransformerBlock, Transformer2DModel
from .core import ExerciseError, ModuleRecorder, Slips, check_module, first_slip, randn
from .core import close as _close
from .core import module_case as _case

__all__ = ["check_multi_head_attention", "check_transformer_block", "check_spatial_transformer",
           "reference_multi_head_attention"]


def _input_of(call: list) -> Any:
    """The tokens a recorded call received: its first argument, or ``hidden_states=``."""
    return call[1][0] if call[1] else call[2].get("hidden_states", next(iter(call[2].values()), None))


def _context_of(call: list) -> Any:
    """The ``encoder_hidden_states`` a recorded call received (second argument or keyword), else None."""
    return call[1][1] if len(call[1]) > 1 else call[2].get("encoder_hidden_states")


# ----------------------------------------------------------------------------- 1. multi-head attention


def reference_multi_head_attention(attn: Attention, hidden_states: torch.Tensor,
                                   encoder_hidden_states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """minisd's ``Attention`` forward, and the probabilities (B, h, N, L) it records for ``AttentionStore``."""
    previous, attn.captured = attn.captured, []
    try:
        out = attn(hidden_states, encoder_hidden_states)
        probs = attn.captured[0]
    finally:
        attn.captured = previous
    return out, probs


def _attention_steps(attn: Attention, x: torch.Tensor, context: torch.Tensor | None) -> dict:
    """Attention's intermediates (Vaswani et al. 2017, eq. 1), checked against the module and F.sdpa, and slips."""
    kv = x if context is None else context
    (B, N, _), L, h, d = x.shape, kv.shape[1], attn.heads, attn.dim_head
    q, k, v = attn.to_q(x), attn.to_k(kv), attn.to_v(kv)  # (B, N | L, h·d)
    split = lambda t: t.reshape(B, t.shape[1], h, d).transpose(1, 2)  # (B, h, n, d)  # noqa: E731
    interleaved = lambda t: t.reshape(B, t.shape[1], d, h).permute(0, 3, 1, 2)  # noqa: E731
    unsplit = lambda t: t.reshape(B, h, t.shape[1], d)  # noqa: E731
    probs_of = lambda qs, ks, scale: (qs @ ks.transpose(-1, -2) * scale).softmax(dim=-1)  # noqa: E731
    s = 1 / math.sqrt(d)
    probs = probs_of(split(q), split(k), s)  # (B, h, N, L)
    heads_out = probs @ split(v)  # (B, h, N, d)
    merged = heads_out.transpose(1, 2).reshape(B, N, h * d)  # (B, N, h·d)
    out, recorded = reference_multi_head_attention(attn, x, context)
    torch.testing.assert_close(attn.to_out[0](merged), out)  # the written-out steps are the module's …
    torch.testing.assert_close(F.scaled_dot_product_attention(split(q), split(k), split(v)), heads_out)  # … and torch's
    torch.testing.assert_close(recorded, probs)
    merged_slips = [
        (heads_out.reshape(B, N, h * d), "the merge reshapes (B, h, N, d) straight to (B, N, h·d), which mixes "
                                         "pixels and heads: transpose(1, 2) first"),
        (heads_out.permute(0, 2, 3, 1).reshape(B, N, h * d), "the merge interleaves the heads' channels: put the heads "
                                                             "side by side, transpose(1, 2).reshape(B, N, h·d)")]
    return {"shape": (B, h, N, L), "merged": (merged, merged_slips), "probs": (probs, [
        (probs_of(split(q), split(k), 1.0), "the scores Q Kᵀ are not scaled: divide them by √d (d = attn.dim_head)"),
        (probs_of(split(q), split(k), 1 / d), "the scores are divided by d: divide them by √d"),
        (probs_of(split(q), split(k), 1 / math.sqrt(h * d)), "the scores are divided by √(h·d), the width of all "
                                                             "heads: d is the channels of ONE head (attn.dim_head)"),
        (probs_of(split(q), split(v), s), "the scores use V where K belongs: Q Kᵀ with K = to_k(…)"),
        (probs_of(interleaved(q), interleaved(k), s), "the head split is transposed: reshape(B, n, d, h) gives head i "
         "every h-th channel; a head is a block of d consecutive channels: reshape(B, n, h, d).transpose(1, 2)"),
        (probs_of(unsplit(q), unsplit(k), s), "the head split reshapes (B, n, h·d) straight to (B, h, n, d), which "
                                              "mixes pixels and heads: reshape to (B, n, h, d), then transpose(1, 2)")]),
        "out": (out, [(attn.to_out[0](m), hint) for m, hint in merged_slips] + [
            (merged, "the output projection is missing: return attn.to_out[0](merged heads)"),
            (out + x, "Attention itself adds no residual (the transformer block does): return to_out[0](…) alone")])}


def _attention_calls(where: str, attn: Attention, inputs: tuple, rec: ModuleRecorder, error: Exception | None = None) -> None:
    """Q from the image tokens; K and V from the text (cross-attention) or the image (self-attention)."""
    x, context = inputs
    source = ("the text tokens, encoder_hidden_states (cross-attention)" if context is not None
              else "hidden_states too (self-attention: encoder_hidden_states is None)")
    for name, right, comes_from in (("to_q", x, "the image tokens, hidden_states"), ("to_k", context, source),
                                    ("to_v", context, source)):
        call = rec.first(name)
        if call is not None and not _close(_input_of(call), x if right is None else right):
            raise ExerciseError(f"{where}: {name} was applied to the wrong tokens: {name[-1].upper()} comes from {comes_from}.")


def _diagnose_attention(where: str, attn: Attention, inputs: tuple, steps: dict, got: Any, rec: ModuleRecorder) -> None:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise ExerciseError(f"{where} should return a pair (output, attention_probs), got {type(got).__name__}.")
    out, probs = got
    shape = B, h, N, L = steps["shape"]
    if not isinstance(probs, torch.Tensor):
        raise ExerciseError(f"{where}: attention_probs is a {type(probs).__name__}, expected a (B, h, N, L) tensor.")
    if isinstance(out, torch.Tensor) and out.shape == shape and probs.shape != shape:
        raise ExerciseError(f"{where}: return (output, attention_probs) in this order.")
    if probs.shape != shape:
        hint = {(B, h, L, N): "rows must be the N query pixels and columns the L key tokens: Q Kᵀ, not K Qᵀ",
                (B, N, L): "keep one map per head"}.get(tuple(probs.shape), "one row per pixel, one column per token, per head")
        raise ExerciseError(f"{where}: attention_probs has shape {tuple(probs.shape)}, expected (B, h, N, L) = {shape}: {hint}.")
    probs = probs.detach().double()
    sums_to_one = {dim: torch.allclose(probs.sum(dim), torch.ones(()).double(), atol=1e-4) for dim in (-1, -2, 1)}
    if not sums_to_one[-1]:
        hint = ("the softmax ran over the pixels (dim=-2); it must run over the tokens, dim=-1" if sums_to_one[-2] else
                "the softmax ran over the heads (dim=1); it must run over the tokens, dim=-1" if sums_to_one[1] else
                "apply softmax(dim=-1) to the scores")
        raise ExerciseError(f"{where}: each pixel's weights over the L tokens must sum to 1 (attention_probs.sum(-1) == 1), "
                            f"got sums like {probs.sum(-1).flatten()[:3].tolist()}: {hint}.")
    first_slip(where, "attention_probs", probs, *steps["probs"])
    out_call = rec.first("to_out.0")
    if out_call is not None:
        first_slip(where, "the merge of the heads (the input of to_out[0])", _input_of(out_call), *steps["merged"])
    first_slip(where, "the output", out, *steps["out"])


def check_multi_head_attention(fn: Callable) -> Callable:
    """Check ``fn(attn, hidden_states, encoder_hidden_states=None)`` -> (output (B, N, C), probs (B, h, N, L))."""
    def case(seed: int, B: int, N: int, C: int, heads: int, L: int = 0, D: int | None = None) -> Callable:
        x, context = randn(B, N, C, seed=seed), randn(B, L, D, seed=seed + 1) if D else None
        return _case(Attention(C, D, heads=heads, dim_head=C // heads), (x, context), _attention_steps, seed)

    cases = [("cross-attention: 2 images of 12 pixels, C=32, 4 heads; 5 text tokens of width 24", case(80, 2, 12, 32, 4, 5, 24)),
             ("self-attention: 1 image of 9 pixels, C=32, 2 heads; encoder_hidden_states=None", case(81, 1, 9, 32, 2)),
             ("cross-attention: 3 images of 16 pixels, C=16, 2 heads; 7 text tokens of width 8", case(82, 3, 16, 16, 2, 7, 8))]
    return check_module("multi_head_attention", fn, reference_multi_head_attention, cases,
                "minisd's Attention and F.scaled_dot_product_attention (output and probabilities)",
                _attention_calls, _diagnose_attention)


# ----------------------------------------------------------------------------- 2. the transformer block


def _block_steps(block: BasicTransformerBlock, x: torch.Tensor, context: torch.Tensor) -> dict:
    """What attn1, attn2 and ff should read, and the output (h = x + attn1(norm1 x); h + attn2(norm2 h, c);
    h + ff(norm3 h)), each with the slips that give something else."""
    a1 = block.attn1(block.norm1(x))
    h1 = x + a1
    a2 = block.attn2(block.norm2(h1), context)
    h2 = h1 + a2
    f = block.ff(block.norm3(h2))
    torch.testing.assert_close(h2 + f, block(x, context))

    def wrong_norms(h: torch.Tensor, right: str, what: str) -> Slips:
        return [(getattr(block, name)(h), f"{what} reads {name}(h): each sub-layer has its own norm, {what} goes with "
                 f"{right}") for name in ("norm1", "norm2", "norm3") if name != right]

    return {
        "attn1": (block.norm1(x), [(x, "attn1 reads hidden_states un-normalised: pre-norm means attn1(norm1(hidden_states))")]
                  + wrong_norms(x, "norm1", "attn1")),
        "attn2": (block.norm2(h1), [
            (block.norm2(a1), "the residual around attn1 is missing: h = hidden_states + attn1(norm1(hidden_states))"),
            (block.norm2(x), "attn2 reads norm2(hidden_states), the block's input: it must read h after self-attention"),
            (h1, "attn2 reads h un-normalised: attn2(norm2(h), encoder_hidden_states)")] + wrong_norms(h1, "norm2", "attn2")),
        "ff": (block.norm3(h2), [
            (block.norm3(a2), "the residual around attn2 is missing: h = h + attn2(norm2(h), encoder_hidden_states)"),
            (block.norm3(h1), "attn2's output is never added to h: h = h + attn2(norm2(h), encoder_hidden_states)"),
            (h2, "ff reads h un-normalised: ff(norm3(h))")] + wrong_norms(h2, "norm3", "ff")),
        "out": (h2 + f, [(f, "the residual around ff is missing: return h + ff(norm3(h))"),
                         (h2, "ff's output is never added: return h + ff(norm3(h))")]),
    }


def _block_calls(where: str, block: BasicTransformerBlock, inputs: tuple, rec: ModuleRecorder, error: Exception | None = None) -> None:
    """attn1 sees no text; attn2 sees encoder_hidden_states."""
    attn1, attn2 = rec.first("attn1"), rec.first("attn2")
    if attn1 is not None and _context_of(attn1) is not None:
        raise ExerciseError(f"{where}: attn1 is self-attention: call it without encoder_hidden_states.")
    if attn2 is not None and not _close(_context_of(attn2), inputs[1]):
        raise ExerciseError(f"{where}: attn2 is the cross-attention: pass it encoder_hidden_states as its second argument.")


def _diagnose_block(where: str, block: BasicTransformerBlock, inputs: tuple, steps: dict, got: Any, rec: ModuleRecorder) -> None:
    roles = {"attn1": "the self-attention attn1", "attn2": "the cross-attention attn2", "ff": "the feed-forward ff"}
    for name, role in roles.items():
        if rec.first(name) is None:
            raise ExerciseError(f"{where}: {role} is never called.")
    order = sorted(roles, key=lambda name: rec.calls.index(rec.first(name)))
    if order != list(roles):
        raise ExerciseError(f"{where}: the sub-layers run in the order {', '.join(order)}; a transformer block runs "
                            "attn1 (pixels look at pixels), then attn2 (pixels look at the text), then ff.")
    for name in roles:
        first_slip(where, f"the input of {name}", _input_of(rec.first(name)), *steps[name])
    first_slip(where, "the output", got, *steps["out"])


def check_transformer_block(fn: Callable) -> Callable:
    """Check ``fn(block, hidden_states, encoder_hidden_states)`` -> (B, N, C), against BasicTransformerBlock."""
    def case(seed: int, B: int, N: int, C: int, heads: int, L: int, D: int) -> Callable:
        inputs = randn(B, N, C, seed=seed), randn(B, L, D, seed=seed + 1)
        return _case(BasicTransformerBlock(C, heads, D), inputs, _block_steps, seed)

    cases = [("2 images of 12 tokens, C=32, 4 heads; 5 text tokens of width 24", case(83, 2, 12, 32, 4, 5, 24)),
             ("1 image of 4 tokens, C=16, 2 heads; 3 text tokens of width 8", case(84, 1, 4, 16, 2, 3, 8))]
    return check_module("transformer_block", fn, lambda block, x, c: block(x, c), cases, "BasicTransformerBlock",
                _block_calls, _diagnose_block)


# ----------------------------------------------------------------------------- 3. the spatial transformer


def _spatial_steps(model: Transformer2DModel, x: torch.Tensor, context: torch.Tensor) -> dict:
    """Transformer2DModel's intermediates (SD v1: 1×1-conv projections) with the slips' versions."""
    B, C, H, W = x.shape
    to_tokens = lambda m: m.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, N, C), token y·W + x = pixel (y, x)  # noqa: E731
    p = model.proj_in(model.norm(x))  # (B, C, H, W)
    h = tokens = to_tokens(p)
    for block in model.transformer_blocks:
        h = block(h, context)  # (B, N, C)
    back = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
    out = x + model.proj_out(back)
    torch.testing.assert_close(out, model(x, context))
    return {
        "tokens": (tokens, [
            (p.reshape(B, H * W, C), "(B, C, H, W).reshape(B, H·W, C) mixes channels and pixels: move C last first, "
                                     "permute(0, 2, 3, 1), then reshape"),
            (p.permute(0, 3, 2, 1).reshape(B, H * W, C), "the pixels are ordered column by column; token y·W + x "
                                                         "must be pixel (y, x), row by row: permute(0, 2, 3, 1)"),
            (to_tokens(model.norm(x)), "proj_in (a 1×1 conv) is missing: norm, then proj_in, then the tokens"),
            (to_tokens(model.proj_in(x)), "the GroupNorm (transformer.norm) is missing: norm, then proj_in"),
            (to_tokens(model.norm(model.proj_in(x))), "norm and proj_in are swapped: norm first, then proj_in")]),
        "back": (back, [
            (h.reshape(B, C, H, W), "reshape(B, C, H, W) straight from (B, N, C) scrambles the tokens: "
                                    "reshape(B, H, W, C), then permute(0, 3, 1, 2)"),
            (h.reshape(B, W, H, C).permute(0, 3, 2, 1), "the tokens are put back column by column: "
                                                        "reshape(B, H, W, C), then permute(0, 3, 1, 2)"),
            (p, "proj_out reads the map from before the transformer blocks: use the blocks' output")]),
        "out": (out, [(out - x, "the residual is missing: return hidden_states + proj_out(h)"),
                      (x + back, "proj_out is missing: return hidden_states + proj_out(h)")]),
    }


def _spatial_calls(where: str, model: Transformer2DModel, inputs: tuple, rec: ModuleRecorder, error: Exception | None = None) -> None:
    """Every transformer block gets (B, H·W, C) tokens and the text states."""
    B, C, H, W = inputs[0].shape
    for call in (c for c in rec.calls if c[0].startswith("transformer_blocks.") and c[0].count(".") == 1):
        tokens = _input_of(call)
        if isinstance(tokens, torch.Tensor) and tokens.shape != (B, H * W, C):
            hint = " (channels first: move C last)" if tokens.shape == (B, C, H * W) else ""
            raise ExerciseError(f"{where}: {call[0]} got tokens of shape {tuple(tokens.shape)}{hint}; the blocks read "
                                f"(B, H·W, C) = {(B, H * W, C)}.")
        if not _close(_context_of(call), inputs[1]):
            raise ExerciseError(f"{where}: pass encoder_hidden_states to every block: block(h, encoder_hidden_states).")


def _diagnose_spatial(where: str, model: Transformer2DModel, inputs: tuple, steps: dict, got: Any, rec: ModuleRecorder) -> None:
    blocks = [rec.first(f"transformer_blocks.{i}") for i in range(len(model.transformer_blocks))]
    for i, call in enumerate(blocks):
        if call is None:
            hint = "loop over transformer.transformer_blocks" if i else "call each block on the tokens"
            raise ExerciseError(f"{where}: transformer block {i} of {len(blocks)} is never called: {hint}.")
    first_slip(where, "the token sequence given to the first transformer block", _input_of(blocks[0]), *steps["tokens"])
    for i in range(1, len(blocks)):
        if not _close(_input_of(blocks[i]), blocks[i - 1][3]):
            raise ExerciseError(f"{where}: transformer block {i} must read block {i - 1}'s output: h = block(h, …) in a loop.")
    proj_out = rec.first("proj_out")
    if proj_out is not None:
        first_slip(where, "the feature map given to proj_out", _input_of(proj_out), *steps["back"])
    first_slip(where, "the output", got, *steps["out"])


def check_spatial_transformer(fn: Callable) -> Callable:
    """Check ``fn(transformer, hidden_states, encoder_hidden_states)`` -> (B, C, H, W), against Transformer2DModel."""
    def case(seed: int, B: int, H: int, W: int, heads: int, layers: int, L: int, D: int) -> Callable:
        inputs = randn(B, 16, H, W, seed=seed), randn(B, L, D, seed=seed + 1)
        return _case(Transformer2DModel(16, heads, D, num_layers=layers, norm_num_groups=4), inputs, _spatial_steps, seed)

    cases = [("2 feature maps 16×3×4 (H ≠ W), 1 block, 2 heads; 5 text tokens of width 24", case(85, 2, 3, 4, 2, 1, 5, 24)),
             ("1 feature map 16×2×5, 2 blocks, 4 heads; 3 text tokens of width 8", case(86, 1, 2, 5, 4, 2, 3, 8))]
    return check_module("spatial_transformer", fn, lambda model, x, c: model(x, c), cases, "Transformer2DModel",
                _spatial_calls, _diagnose_spatial)
