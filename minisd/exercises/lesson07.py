"""Checks for lesson 07: text encoders.

These answers have several parts (ids and a mask, a sum and a count, a transpose), so each check
goes through them in order and names the first part that differs, instead of only the largest
difference.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .. import text
from .core import Case, ExerciseError, check_parts, compare, randn

__all__ = ["check_pad_and_truncate", "check_masked_mean", "check_cosine_similarity_matrix", "check_causal_mask"]


def _as_tensor(where: str, what: str, value: Any) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except Exception as error:  # noqa: BLE001 - any non-tensor answer gets the same message
        raise ExerciseError(f"{where}: {what} is a {type(value).__name__}, expected a tensor or a list.") from error


# ----------------------------------------------------------------------------- pad_and_truncate


def _diagnose_framing(where: str, case: Case, expected: tuple, got: Any) -> None:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise ExerciseError(f"{where} should return a pair (input_ids, attention_mask), got {type(got).__name__}.")
    ids, mask = _as_tensor(where, "input_ids", got[0]).long(), _as_tensor(where, "attention_mask", got[1])
    mask = mask.long() if mask.dtype == torch.bool else mask
    k = case.kwargs
    L, bos, eos, pad = k["max_length"], k["bos_token_id"], k["eos_token_id"], k["pad_token_id"]
    kept = list(k["token_ids"][: L - 2])
    n = len(kept)
    if ids.shape != (L,):
        hint = ("cut the pieces to max_length - 2 *before* adding BOS and EOS" if ids.numel() > L
                else "pad with pad_token_id up to max_length")
        raise ExerciseError(f"{where}: input_ids has shape {tuple(ids.shape)}, expected ({L},) (max_length). Hint: {hint}.")
    if ids[0] != bos:
        raise ExerciseError(f"{where}: position 0 should be BOS ({bos}), got {ids[0].item()}.")
    if ids[1:n + 1].tolist() != kept:
        raise ExerciseError(f"{where}: positions 1..{n} should be the first {n} piece ids {kept}, "
                            f"got {ids[1:n + 1].tolist()}. Keep the *first* max_length - 2 pieces.")
    if ids[n + 1] != eos:
        raise ExerciseError(f"{where}: position {n + 1}, right after the last piece, should be EOS ({eos}), "
                            f"got {ids[n + 1].item()}. Every prompt ends with EOS, even a cut one.")
    if ids[n + 2:].ne(pad).any():
        raise ExerciseError(f"{where}: positions {n + 2}..{L - 1} should be padding ({pad}), got {ids[n + 2:].tolist()}.")
    if mask.shape != (L,):
        raise ExerciseError(f"{where}: attention_mask has shape {tuple(mask.shape)}, expected ({L},).")
    wrong = (mask != expected[1]).nonzero().flatten()
    if len(wrong):
        p = wrong[0].item()
        hint = (" SD v1 pads with EOS itself, so `input_ids != pad_token_id` cannot tell EOS from padding: "
                "count positions instead." if eos == pad and p == n + 1 else "")
        raise ExerciseError(f"{where}: attention_mask[{p}] should be {expected[1][p].item()}, got {mask[p].item()} "
                            f"(1 for BOS, the pieces and EOS: positions 0..{n + 1}; 0 for padding).{hint}")


def check_pad_and_truncate(fn: Callable) -> Callable:
    """Check ``fn(token_ids, max_length, bos_token_id, eos_token_id, pad_token_id)`` -> (input_ids, attention_mask)."""
    clip = {"bos_token_id": text.CLIP_BOS, "eos_token_id": text.CLIP_EOS, "pad_token_id": text.CLIP_EOS}
    minilm = {"bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0}
    photo = [320, 1125, 539, 320, 2368]  # CLIP: "a photo of a cat"
    cases = [Case({"token_ids": [320, 736, 4861, 330], "max_length": 8, **minilm}, "MiniLM-style, short"),
             Case({"token_ids": photo, "max_length": 10, **clip}, "CLIP, padded with EOS"),
             Case({"token_ids": photo, "max_length": 7, **clip}, "exactly fits"),
             Case({"token_ids": photo * 3, "max_length": 9, **clip}, "too long: cut"),
             Case({"token_ids": [], "max_length": 4, **minilm}, "empty prompt")]
    return check_parts("pad_and_truncate", fn, text.pad_and_truncate, cases, _diagnose_framing)


# ----------------------------------------------------------------------------- masked_mean


def _diagnose_mean(where: str, case: Case, expected: torch.Tensor, got: Any) -> None:
    got = _as_tensor(where, "the result", got)
    h, m = case.kwargs["hidden_states"], case.kwargs["attention_mask"].to(torch.float32).unsqueeze(-1)
    B, L, D = h.shape
    if got.shape == (B, L, D):
        raise ExerciseError(f"{where} returned shape {tuple(got.shape)}, expected ({B}, {D}): sum over the tokens (dim=1).")
    if got.shape == (B,) or got.shape == (D,):
        raise ExerciseError(f"{where} returned shape {tuple(got.shape)}, expected ({B}, {D}): one mean over the "
                            "tokens (dim=1) per prompt, keeping the features.")
    slips = [(h.mean(1), "the mean over all L positions, padding included: weight each state by its mask value"),
             ((h * m).sum(1) / L, "the masked sum divided by L: divide by the number of real tokens, mask.sum(1)"),
             ((h * m).sum(1), "the masked sum: now divide it by the number of real tokens")]
    for wrong, hint in slips:
        if got.shape == wrong.shape and torch.allclose(got.double(), wrong.double(), atol=1e-5) and \
                not torch.allclose(wrong, expected, atol=1e-5):
            raise ExerciseError(f"{where} looks like {hint}.")
    compare("masked_mean", case, expected, got, atol=1e-5, rtol=1e-5)


def check_masked_mean(fn: Callable) -> Callable:
    """Check ``fn(hidden_states, attention_mask)``: mean of the states at real positions, (B, L, D) -> (B, D)."""
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    cases = [Case({"hidden_states": randn(3, 6, 4, seed=70), "attention_mask": mask}, "three prompts, 3-6 real tokens"),
             Case({"hidden_states": randn(2, 5, 8, seed=71) + 3, "attention_mask": mask[:2, :5].bool()}, "a bool mask")]
    return check_parts("masked_mean", fn, text.masked_mean, cases, _diagnose_mean)


# ----------------------------------------------------------------------------- cosine similarity


def _diagnose_cosine(where: str, case: Case, expected: torch.Tensor, got: Any) -> None:
    got = _as_tensor(where, "the result", got)
    e = case.kwargs["embeddings"]
    N = e.shape[0]
    if got.shape != (N, N):
        raise ExerciseError(f"{where} returned shape {tuple(got.shape)}, expected ({N}, {N}): one similarity per "
                            "pair of rows, e.g. unit @ unit.T.")
    if not torch.allclose(got.diagonal().double(), torch.ones(N, dtype=torch.float64), atol=1e-4):
        hint = ("that is the plain dot product: divide each row by its norm first"
                if torch.allclose(got.double(), (e @ e.T).double(), atol=1e-4)
                else "normalise each row (each embedding, dim=-1) to length 1")
        raise ExerciseError(f"{where}: the diagonal should be all 1 (each vector compared with itself), "
                            f"got {got.diagonal()[:4].tolist()}: {hint}.")
    compare("cosine_similarity_matrix", case, expected, got, atol=1e-5, rtol=1e-5)


def check_cosine_similarity_matrix(fn: Callable) -> Callable:
    """Check ``fn(embeddings)``: S_ij = cos(e_i, e_j), (N, D) -> (N, N)."""
    cases = [Case({"embeddings": randn(5, 16, seed=72) * torch.arange(1, 6)[:, None]}, "5 vectors of different lengths"),
             Case({"embeddings": randn(3, 384, seed=73) + 2}, "3 vectors, all pointing one way")]
    return check_parts("cosine_similarity_matrix", fn, text.cosine_similarity_matrix, cases, _diagnose_cosine)


# ----------------------------------------------------------------------------- causal mask


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """True where attention is allowed, from a bool/0-1 mask or an additive one (0 allowed, -inf blocked)."""
    if mask.is_floating_point() and ((mask < 0).any() or (mask == 0).all()):  # all-zero: additive, all allowed
        return mask == 0
    return mask != 0


def _diagnose_causal(where: str, case: Case, expected: torch.Tensor, got: Any) -> None:
    got = _allowed(_as_tensor(where, "the mask", got))
    L = case.kwargs["seq_len"]
    if got.shape != (L, L):
        raise ExerciseError(f"{where} returned shape {tuple(got.shape)}, expected ({L}, {L}): row i = query, column j = key.")
    if torch.equal(got, expected.T) and L > 1:
        raise ExerciseError(f"{where} is the transpose of the causal mask: row i is the query token, column j the key; "
                            "token i may look at j only if j <= i (lower triangle).")
    if not got.diagonal().all():
        raise ExerciseError(f"{where}: the diagonal is blocked, but each token must see itself (j = i).")
    if got.triu(1).any():
        raise ExerciseError(f"{where}: some token sees a later one (a True above the diagonal, j > i).")
    wrong = (got != expected).nonzero()
    if len(wrong):
        i, j = wrong[0].tolist()
        raise ExerciseError(f"{where}: token {i} should be allowed to see token {j} (j <= i): use the whole lower triangle.")


def check_causal_mask(fn: Callable) -> Callable:
    """Check ``fn(seq_len)``: (L, L) mask, True (or 0 in an additive mask) where key j <= query i."""
    cases = [Case({"seq_len": n}, f"L={n}") for n in (1, 4, 77)]
    return check_parts("causal_mask", fn, text.causal_mask, cases, _diagnose_causal)
