"""Tests of minisd.data: captions agree with pixels, seeding, photos, and friendly errors."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from minisd.data import (
    ALL_FONTS, CHARACTERS, COLOURS, DIFFICULTIES, EASY_FONTS, FONT_DIR, PHOTOS, GlyphDataset,
    GlyphSpec, all_combinations, glyph_caption, held_out_combinations, load_photo, photo_patches,
    render_glyph, sample_glyph_specs,
)

COLOUR_RGB = np.array(list(COLOURS.values()), dtype=np.float32)  # (8, 3), row = colour index
CAPTION = re.compile(r"^(a|an) (\w+) (letter|digit) (\w) on (a|an) (\w+) background$")


@pytest.fixture(scope="module")
def easy() -> GlyphDataset:
    return GlyphDataset(200, seed=0)


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) float in [0, 255]."""
    return ((images + 1) * 127.5).permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- fonts


def test_font_files_exist_and_easy_is_a_subset():
    assert len(ALL_FONTS) == 21 and len(EASY_FONTS) == 6
    for font in ALL_FONTS:
        assert (FONT_DIR / font).is_file(), font
    assert set(EASY_FONTS) <= set(ALL_FONTS)


@pytest.mark.parametrize("font", ALL_FONTS)
def test_every_font_draws_36_different_glyphs(font):
    # a face without letters would draw the same box (tofu) for each character
    masks = np.stack([
        np.asarray(render_glyph(GlyphSpec(c, font, "white", "black"), grayscale=True), np.float32)
        for c in CHARACTERS
    ]).reshape(36, -1) / 255
    dist = np.abs(masks[:, None] - masks[None]).mean(-1)  # (36, 36) mean |difference|
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 0.01  # closest measured pair: I vs 1 in DejaVuSansMono, 0.026


# ----------------------------------------------------------------------------- captions = pixels


def test_dataset_shapes_labels_and_collate(easy):
    assert easy.images.shape == (200, 3, 32, 32) and easy.images.dtype == torch.float32
    assert easy.images.min() >= -1 and easy.images.max() <= 1
    assert len(easy) == len(easy.captions) == len(easy.specs) == 200
    batch = next(iter(torch.utils.data.DataLoader(easy, batch_size=8)))
    assert batch["image"].shape == (8, 3, 32, 32) and len(batch["caption"]) == 8
    assert batch["char"].shape == batch["fg"].shape == batch["bg"].shape == (8,)


def test_caption_words_match_spec_and_labels(easy):
    colours = list(COLOURS)
    for i, (spec, caption) in enumerate(zip(easy.specs, easy.captions)):
        _, fg, kind, char, _, bg = CAPTION.match(caption).groups()
        assert (fg, char, bg) == (spec.fg, spec.char, spec.bg)
        assert kind == ("digit" if char in "0123456789" else "letter")
        assert CHARACTERS[easy.chars[i]] == char
        assert colours[easy.fg[i]] == fg and colours[easy.bg[i]] == bg


def test_pixels_show_the_captioned_colours(easy):
    images = to_uint8_hwc(easy.images)
    for image, fg, bg in zip(images, easy.fg, easy.bg):
        fg_rgb, bg_rgb = COLOUR_RGB[fg], COLOUR_RGB[bg]
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]  # (4, 3)
        assert np.abs(corners - bg_rgb).max() <= 2
        # the pixels farthest from the background are the glyph's fully inked core
        distance = np.linalg.norm(image - bg_rgb, axis=-1).ravel()
        core = image.reshape(-1, 3)[np.argsort(distance)[-10:]]
        assert np.abs(np.median(core, axis=0) - fg_rgb).max() <= 4


def ink_signature(mask: np.ndarray, side: int = 16) -> np.ndarray:
    """Crop a [0, 1] ink mask to its ink, pad to a square (keeps O vs 0), resize, normalise."""
    rows, cols = np.nonzero(mask > 0.3)
    crop = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = crop.shape
    s = max(h, w)
    square = np.zeros((s, s), np.float32)
    top, left = (s - h) // 2, (s - w) // 2
    square[top:top + h, left:left + w] = crop
    small = np.asarray(Image.fromarray(square).resize((side, side), Image.BILINEAR)).ravel()
    small = small - small.mean()
    return small / np.linalg.norm(small)


def test_nearest_template_reads_the_captioned_character(easy):
    # Template per (font, character): centred, no jitter, grey-scale. Each RGB glyph is turned
    # into an ink mask by its distance from the corner (background) colour, with no look at the
    # labels, and classified by the best correlation among the 36 templates of its font.
    # Measured: 200 / 200 correct (seed 0).
    templates = {
        font: np.stack([ink_signature(np.asarray(
            render_glyph(GlyphSpec(c, font, "white", "black"), grayscale=True), np.float32) / 255)
            for c in CHARACTERS])
        for font in EASY_FONTS
    }
    correct = 0
    for image, spec, label in zip(to_uint8_hwc(easy.images), easy.specs, easy.chars):
        distance = np.linalg.norm(image - image[0, 0], axis=-1)
        scores = templates[spec.font] @ ink_signature(distance / distance.max())
        correct += int(scores.argmax() == label)
    assert correct >= 180, f"only {correct} / 200 glyphs read as their caption's character"


def test_grayscale_is_white_ink_on_black():
    grey = GlyphDataset(50, seed=0, grayscale=True)
    assert grey.images.shape == (50, 1, 32, 32)
    assert torch.all(grey.images.amin(dim=(1, 2, 3)) == -1)  # background
    assert torch.all(grey.images.amax(dim=(1, 2, 3)) > 0.9)  # fully inked pixels
    assert grey.images[:, :, 0, 0].eq(-1).all()
    assert all(re.fullmatch(r"a (letter [A-Z]|digit [0-9])", c) for c in grey.captions)
    # the same specs as the RGB set, only drawn in grey
    assert grey.specs == GlyphDataset(50, seed=0).specs


def test_render_glyph_modes_and_sizes():
    spec = GlyphSpec("K", "DejaVuSans.ttf", "red", "orange")
    rgb, grey = render_glyph(spec, size=48), render_glyph(spec, size=16, grayscale=True)
    assert rgb.mode == "RGB" and rgb.size == (48, 48)
    assert grey.mode == "L" and grey.size == (16, 16)
    assert rgb.getpixel((0, 0)) == COLOURS["orange"]


@pytest.mark.parametrize("difficulty", list(DIFFICULTIES))
def test_jitter_never_cuts_ink_off(difficulty):
    # moving the glyph off centre keeps all its ink inside the frame
    for spec in sample_glyph_specs(100, seed=1, difficulty=difficulty):
        centred = GlyphSpec(spec.char, spec.font, spec.fg, spec.bg, spec.scale, 0.0, 0.0, spec.angle)
        ink = np.asarray(render_glyph(spec, grayscale=True), np.float32).sum()
        ink_centred = np.asarray(render_glyph(centred, grayscale=True), np.float32).sum()
        assert abs(ink - ink_centred) <= 0.03 * ink_centred, spec


def test_specs_are_varied_and_follow_the_difficulty():
    easy, hard = sample_glyph_specs(2000, seed=0), sample_glyph_specs(2000, seed=0, difficulty="hard")
    assert {s.font for s in easy} == set(EASY_FONTS) and {s.font for s in hard} == set(ALL_FONTS)
    assert {s.char for s in easy} == set(CHARACTERS)
    assert {(s.fg, s.bg) for s in easy} == {(f, b) for f in COLOURS for b in COLOURS if f != b}
    assert all(s.angle == 0 and 0.70 <= s.scale <= 0.85 for s in easy)
    assert max(abs(s.angle) for s in hard) > 15 and min(s.scale for s in hard) < 0.55


# ----------------------------------------------------------------------------- seeding


def test_same_seed_same_images_other_seed_other_images():
    a, b, c = GlyphDataset(40, seed=7), GlyphDataset(40, seed=7), GlyphDataset(40, seed=8)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images) and a.captions != c.captions
    h1, h2 = GlyphDataset(20, seed=7, difficulty="hard"), GlyphDataset(20, seed=7, difficulty="hard")
    assert torch.equal(h1.images, h2.images)


# ----------------------------------------------------------------------------- grammar


def test_caption_examples():
    assert GlyphSpec("K", "cmr10.ttf", "red", "orange").caption == "a red letter K on an orange background"
    assert GlyphSpec("7", "cmr10.ttf", "blue", "white").caption == "a blue digit 7 on a white background"
    assert GlyphSpec("K", "cmr10.ttf", "red", "orange").grayscale_caption == "a letter K"
    assert GlyphSpec("7", "cmr10.ttf", "blue", "white").grayscale_caption == "a digit 7"


def test_articles_agree_with_the_next_word():
    for fg in COLOURS:
        for bg in COLOURS:
            if fg == bg:
                continue
            for char in "A7":
                caption = GlyphSpec(char, "cmr10.ttf", fg, bg).caption
                for article, word in re.findall(r"\b(an?) (\w+)", caption):
                    assert (article == "an") == (word[0] in "aeiou"), caption


# ----------------------------------------------------------------------------- photos


@pytest.mark.parametrize("name", PHOTOS)
def test_every_photo_loads_offline(name):
    photo = load_photo(name)
    assert photo.dtype == torch.float32 and photo.ndim == 3 and photo.shape[0] == 3
    assert min(photo.shape[1:]) >= 256
    assert photo.min() >= -1 and photo.max() <= 1 and photo.max() - photo.min() > 1
    small = load_photo(name, size=40)
    assert small.shape == (3, 40, 40) and small.min() >= -1 and small.max() <= 1


def test_grey_photo_has_three_equal_channels():
    camera = load_photo("camera")
    assert torch.equal(camera[0], camera[1]) and torch.equal(camera[1], camera[2])


def test_load_photo_crops_the_centre():
    full = load_photo("coffee")  # (3, 400, 600): the square is columns 100 to 500
    assert full.shape == (3, 400, 600)
    assert torch.allclose(load_photo("coffee", size=400), full[:, :, 100:500], atol=1e-5)


def test_photo_patches_shape_range_and_seed():
    a, b, c = photo_patches(16, size=24, seed=3), photo_patches(16, size=24, seed=3), photo_patches(16, size=24, seed=4)
    assert a.shape == (16, 3, 24, 24) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(p.flatten()[:8].tolist()) for p in a}) == 16  # no two patches alike
    camera = photo_patches(4, seed=0, names=["camera"])
    assert torch.equal(camera[:, 0], camera[:, 2])  # grey photo only


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call, argument", [
    (lambda: GlyphSpec("k", "cmr10.ttf", "red", "blue"), "char"),
    (lambda: GlyphSpec("?", "cmr10.ttf", "red", "blue"), "char"),
    (lambda: GlyphSpec("K", "Arial.ttf", "red", "blue"), "font"),
    (lambda: GlyphSpec("K", "cmr10.ttf", "pink", "blue"), "fg"),
    (lambda: GlyphSpec("K", "cmr10.ttf", "red", "teal"), "bg"),
    (lambda: GlyphSpec("K", "cmr10.ttf", "red", "red"), "fg"),
    (lambda: GlyphSpec("K", "cmr10.ttf", "red", "blue", scale=1.5), "scale"),
    (lambda: render_glyph(GlyphSpec("K", "cmr10.ttf", "red", "blue"), size=4), "size"),
    (lambda: sample_glyph_specs(0), "n"),
    (lambda: sample_glyph_specs(5, difficulty="medium"), "difficulty"),
    (lambda: GlyphDataset(0), "n"),
    (lambda: GlyphDataset(5, size=7), "size"),
    (lambda: GlyphDataset(5, difficulty="extreme"), "difficulty"),
    (lambda: load_photo("eagle"), "name"),
    (lambda: load_photo("camera", size=2), "size"),
    (lambda: photo_patches(0), "n"),
    (lambda: photo_patches(4, size=4), "size"),
    (lambda: photo_patches(4, names=["camera", "lena"]), "names"),
    (lambda: photo_patches(4, names=[]), "names"),
])
def test_bad_arguments_raise_value_error_naming_them(call, argument):
    with pytest.raises(ValueError, match=rf"\b{argument}\b") as error:
        call()
    assert len(str(error.value)) > 20  # says what is allowed, not just the name


def test_error_lists_the_accepted_values():
    with pytest.raises(ValueError) as error:
        GlyphSpec("K", "cmr10.ttf", "pink", "blue")
    assert "'pink'" in str(error.value) and all(c in str(error.value) for c in COLOURS)
    with pytest.raises(ValueError) as error:
        sample_glyph_specs(3, difficulty="medium")
    assert "'medium'" in str(error.value) and "'easy'" in str(error.value) and "'hard'" in str(error.value)


def test_autoencoder_images_mix_glyphs_and_photos_and_hold_two_photos_out():
    from minisd.data import HELD_OUT_PHOTOS, PHOTOS, TRAIN_PHOTOS, autoencoder_images, photo_patches

    images = autoencoder_images(40, size=32, seed=3, photo_fraction=0.5)
    assert images.shape == (40, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, autoencoder_images(40, size=32, seed=3, photo_fraction=0.5))  # seeded
    glyphs = GlyphDataset(20, size=32, seed=3).images
    photos = photo_patches(20, size=32, seed=3, names=TRAIN_PHOTOS)
    for part in (glyphs, photos):  # every glyph and every patch is in the shuffled mix, once
        matches = (images[:, None] == part[None]).flatten(2).all(2)  # (40, 20)
        assert matches.sum(0).eq(1).all()
    assert set(TRAIN_PHOTOS) | set(HELD_OUT_PHOTOS) == set(PHOTOS) and not set(TRAIN_PHOTOS) & set(HELD_OUT_PHOTOS)
    assert autoencoder_images(10, photo_fraction=0.0).shape == (10, 3, 32, 32)
    with pytest.raises(ValueError, match="photo_fraction"):
        autoencoder_images(10, photo_fraction=1.5)


# ----------------------------------------------------------------------------- held-out prompts


def test_there_are_2016_combinations_and_a_tenth_is_held_out():
    combinations = all_combinations()
    assert len(combinations) == len(set(combinations)) == 36 * 8 * 7
    assert all(fg != bg for _, fg, bg in combinations)
    held = held_out_combinations()
    assert len(held) == round(0.1 * 2016) == 202 and held <= set(combinations)


def test_held_out_combinations_are_fixed_by_the_seed():
    assert held_out_combinations() == held_out_combinations(0.1, 0)
    other = held_out_combinations(0.1, 1)
    assert len(other) == 202 and other != held_out_combinations()
    assert held_out_combinations(0.0) == frozenset()
    assert held_out_combinations(0.2) != held_out_combinations(0.1)


def test_no_training_caption_uses_a_held_out_combination():
    held = held_out_combinations()
    train = GlyphDataset(3000, seed=0, exclude=held)
    assert not {s.combination for s in train.specs} & held
    held_captions = {glyph_caption(*c) for c in held}
    assert not set(train.captions) & held_captions
    # the same draw without the exclusion does hit held-out combinations: the filter did the work
    assert {s.combination for s in sample_glyph_specs(3000, seed=0)} & held
    # every character and colour is still in training, only some of their combinations are not
    assert {s.char for s in train.specs} == set(CHARACTERS)
    assert {s.fg for s in train.specs} == {s.bg for s in train.specs} == set(COLOURS)


def test_excluding_nothing_keeps_the_old_draws_and_excluding_everything_raises():
    assert sample_glyph_specs(50, seed=3, exclude=()) == sample_glyph_specs(50, seed=3)
    with pytest.raises(ValueError, match="exclude"):
        sample_glyph_specs(5, exclude=all_combinations())


def test_glyph_caption_is_the_spec_caption():
    for spec in sample_glyph_specs(100, seed=4):
        assert glyph_caption(*spec.combination) == spec.caption
    assert glyph_caption("7", "orange", "red") == "an orange digit 7 on a red background"


def test_bad_share_raises_value_error_naming_it():
    for share in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="share"):
            held_out_combinations(share)
