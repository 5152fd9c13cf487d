"""Lesson 07's checks: right answers pass in any correct form, stubs fall back, slips are named."""

import pytest
import torch

from helpers import assert_right_answer_passes_and_stub_falls_back

from minisd import exercises, text
from minisd.exercises import ExerciseError


def stub(*args, **kwargs):
    raise NotImplementedError


# Correct answers in forms other than minisd's own: lists, bool masks, additive masks, F.normalize.
def learner_pad(token_ids, max_length, bos_token_id, eos_token_id, pad_token_id):
    ids = [bos_token_id] + token_ids[: max_length - 2] + [eos_token_id]
    mask = [True] * len(ids) + [False] * (max_length - len(ids))
    return ids + [pad_token_id] * (max_length - len(ids)), mask


def learner_mean(hidden_states, attention_mask):
    m = attention_mask[..., None].float()
    return torch.einsum("bld,bl->bd", hidden_states, m[..., 0]) / m.sum(1)


def learner_cosine(embeddings):
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    return unit @ unit.T


def learner_additive_causal(seq_len):
    return torch.full((seq_len, seq_len), float("-inf")).triu(1)  # CLIP's form: 0 allowed, -inf blocked


def learner_bool_causal(seq_len):
    i = torch.arange(seq_len)
    return i[None, :] <= i[:, None]


CHECKS = [
    (exercises.check_pad_and_truncate, learner_pad),
    (exercises.check_masked_mean, learner_mean),
    (exercises.check_cosine_similarity_matrix, learner_cosine),
    (exercises.check_causal_mask, learner_additive_causal),
    (exercises.check_causal_mask, learner_bool_causal),
]


@pytest.mark.parametrize("check, answer", CHECKS)
def test_right_answers_pass_and_stubs_fall_back_to_a_reference_that_passes(check, answer, capsys):
    assert_right_answer_passes_and_stub_falls_back(check, answer, capsys)


def test_the_fallbacks_take_the_lessons_calls():
    ids, mask = exercises.check_pad_and_truncate(stub)([320, 2368], 6, text.CLIP_BOS, text.CLIP_EOS, text.CLIP_EOS)
    assert ids.tolist() == [49406, 320, 2368, 49407, 49407, 49407] and mask.tolist() == [1, 1, 1, 1, 0, 0]
    assert exercises.check_causal_mask(stub)(3).sum().item() == 6


def _slip_message(check, slip) -> str:
    with pytest.raises(ExerciseError) as error:
        check(slip)
    return str(error.value)


@pytest.mark.parametrize("slip, words", [
    # cutting the pieces to max_length, forgetting that BOS and EOS need room too
    (lambda token_ids, max_length, bos_token_id, eos_token_id, pad_token_id:
     (lambda ids: (ids + [pad_token_id] * (max_length - len(ids)), [1] * len(ids) + [0] * (max_length - len(ids))))(
         [bos_token_id] + token_ids[:max_length] + [eos_token_id]),
     "shape (11,), expected (9,) (max_length). Hint: cut the pieces to max_length - 2"),
    # cutting after adding EOS: the window is right but EOS is lost
    (lambda token_ids, max_length, bos_token_id, eos_token_id, pad_token_id:
     ([bos_token_id] + (token_ids + [eos_token_id])[: max_length - 1] + [pad_token_id] * max(0, max_length - 2 - len(token_ids)),
      [1] * min(max_length, len(token_ids) + 2) + [0] * max(0, max_length - 2 - len(token_ids))),
     "should be EOS"),
    # keeping the last pieces instead of the first
    (lambda token_ids, max_length, bos_token_id, eos_token_id, pad_token_id:
     learner_pad(token_ids[-(max_length - 2):] if len(token_ids) > max_length - 2 else token_ids, max_length,
                 bos_token_id, eos_token_id, pad_token_id),
     "should be the first"),
    # mask from the ids: SD v1 pads with EOS, so EOS gets masked out
    (lambda token_ids, max_length, bos_token_id, eos_token_id, pad_token_id:
     (lambda ids: (ids, [int(i != pad_token_id) for i in ids]))(
         learner_pad(token_ids, max_length, bos_token_id, eos_token_id, pad_token_id)[0]),
     "cannot tell EOS from padding"),
    # no BOS
    (lambda token_ids, max_length, bos_token_id, eos_token_id, pad_token_id:
     learner_pad(token_ids, max_length, eos_token_id, eos_token_id, pad_token_id), "position 0 should be BOS"),
])
def test_pad_and_truncate_slips_are_named(slip, words):
    message = _slip_message(exercises.check_pad_and_truncate, slip)
    assert "`pad_and_truncate`" in message and words in message, message


@pytest.mark.parametrize("slip, words", [
    (lambda hidden_states, attention_mask: hidden_states.mean(1), "padding included"),
    (lambda hidden_states, attention_mask: (hidden_states * attention_mask[..., None]).sum(1) / hidden_states.shape[1],
     "divided by L"),
    (lambda hidden_states, attention_mask: (hidden_states * attention_mask[..., None]).sum(1), "masked sum"),
    (lambda hidden_states, attention_mask: hidden_states * attention_mask[..., None], "sum over the tokens"),
    (lambda hidden_states, attention_mask: learner_mean(hidden_states, attention_mask) + 0.01, "wrong values"),
])
def test_masked_mean_slips_are_named(slip, words):
    message = _slip_message(exercises.check_masked_mean, slip)
    assert "`masked_mean`" in message and words in message, message


@pytest.mark.parametrize("slip, words", [
    (lambda embeddings: embeddings @ embeddings.T, "plain dot product"),
    (lambda embeddings: learner_cosine(embeddings.T), "expected (5, 5)"),
    (lambda embeddings: (lambda u: u @ u.T)(torch.nn.functional.normalize(embeddings, dim=0)), "normalise each row"),
])
def test_cosine_slips_are_named(slip, words):
    message = _slip_message(exercises.check_cosine_similarity_matrix, slip)
    assert "`cosine_similarity_matrix`" in message and words in message, message


@pytest.mark.parametrize("slip, words", [
    (lambda seq_len: torch.ones(seq_len, seq_len).triu().bool(), "transpose"),
    (lambda seq_len: torch.ones(seq_len, seq_len).tril(-1).bool(), "must see itself"),
    (lambda seq_len: torch.ones(seq_len, seq_len, dtype=torch.bool), "later one"),
    (lambda seq_len: torch.ones(seq_len, seq_len).tril().bool() & ~torch.ones(seq_len, seq_len).tril(-2).bool(),
     "whole lower triangle"),
    (lambda seq_len: torch.ones(seq_len).bool(), "expected (1, 1)"),
])
def test_causal_mask_slips_are_named(slip, words):
    message = _slip_message(exercises.check_causal_mask, slip)
    assert "`causal_mask`" in message and words in message, message


def test_errors_in_learner_code_and_missing_returns_are_explained():
    assert "forget the `return`" in _slip_message(exercises.check_masked_mean, lambda hidden_states, attention_mask: None)
    assert "raised ZeroDivisionError" in _slip_message(exercises.check_causal_mask, lambda seq_len: 1 / 0)
    assert "should return a pair" in _slip_message(
        exercises.check_pad_and_truncate, lambda token_ids, max_length, bos_token_id, eos_token_id, pad_token_id: [1, 2, 3])
