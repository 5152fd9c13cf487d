"""The course's data, all offline: captioned glyphs and real photos.

Glyphs are the course's MNIST and its LAION in one. Each image is a single letter or digit
(36 classes: A-Z, 0-9) drawn with one of the TrueType fonts that ship inside matplotlib, in one
of 8 named colours on a background of another, with a caption that says exactly what is drawn:

    "a red letter K on an orange background"      (RGB)
    "a letter K"                                  (grey-scale: white ink on black)

Real shapes, compositional captions, and a built-in answer key: a small classifier trained on
the same generator can check whether a generated image shows the letter and colours its prompt
asked for. Two difficulties: "easy" (the default: 6 upright fonts, mild jitter), which a
text-to-image model learns on a laptop CPU in about 20 minutes, and "hard" (21 fonts, rotation,
more scale and position jitter) for "going further".

Photos are the sample images that ship with scikit-image and matplotlib, for pictures of
forward diffusion, VAE training patches, image-to-image and inpainting.

All images are float32 tensors in [-1, 1], channels first: (C, H, W) or (N, C, H, W).
"""

import math
import random
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import matplotlib
import matplotlib.cbook
import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"  # 36 classes; uppercase only (see DESIGN.md)

# 8 colours far apart in RGB, so that a 32x32 glyph's colour survives anti-aliasing and a
# classifier (or a learner's eye) never confuses two of them. Order defines the colour index.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (255, 135, 0),
    "yellow": (255, 230, 30),
    "green": (30, 165, 50),
    "blue": (30, 70, 230),
    "purple": (140, 40, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
# Upright, plain text faces: the set that trains to 99.6% prompt accuracy in 20 CPU minutes.
EASY_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf", "cmr10.ttf",
)
# Every matplotlib face with ordinary letters. Left out: DejaVu*Display, STIXNonUni*, STIXSiz*,
# LastResortHE, cmex10, cmsy10, cmmi10 (no letters, boxes, or maths symbols instead).
ALL_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf",
)

# Jitter, as fractions of the image size. "easy" is the set of the feasibility run in DESIGN.md
# (mild jitter, no rotation); "hard" reached only 21% prompt accuracy in 22 CPU minutes.
EASY_SCALE = (0.70, 0.85)   # longest side of the ink box / image size
EASY_MAX_OFFSET = 0.06      # |centre offset| / image size
HARD_SCALE = (0.50, 0.90)
HARD_MAX_OFFSET = 0.12
HARD_MAX_ANGLE = 20.0       # degrees, counter-clockwise


@dataclass(frozen=True)
class Difficulty:
    """How much a glyph varies: the knobs that sample_glyph_specs draws from."""

    fonts: tuple[str, ...]
    scale: tuple[float, float]  # uniform range of GlyphSpec.scale
    max_offset: float           # dx, dy uniform in +-max_offset (kept inside the image)
    max_angle: float            # angle uniform in +-max_angle


DIFFICULTIES = {
    "easy": Difficulty(EASY_FONTS, EASY_SCALE, EASY_MAX_OFFSET, 0.0),
    "hard": Difficulty(ALL_FONTS, HARD_SCALE, HARD_MAX_OFFSET, HARD_MAX_ANGLE),
}

SUPERSAMPLE = 4  # draw at 4x the size, then average 4x4 blocks: smooth, anti-aliased edges
MIN_SIZE = 8     # below 8x8 pixels a glyph is no longer legible


def _check_choice(arg: str, value, choices) -> None:
    if value not in choices:  # a str (CHARACTERS) is shown as is, a dict by its keys
        allowed = repr(choices) if isinstance(choices, str) else tuple(choices)
        raise ValueError(f"{arg}={value!r} is not allowed; choose one of {allowed}")


def _check_at_least(arg: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{arg}={value!r} is too small; it must be an integer >= {minimum}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"  # "an orange", "a red"


def glyph_caption(char: str, fg: str, bg: str) -> str:
    """The training caption of a (character, foreground, background) combination (GlyphSpec.caption)."""
    kind = "digit" if char.isdigit() else "letter"
    return f"{_article(fg)} {fg} {kind} {char} on {_article(bg)} {bg} background"


# ----------------------------------------------------------------------------- glyphs


@dataclass(frozen=True)
class GlyphSpec:
    """Everything needed to draw one glyph image, at any size."""

    char: str           # one of CHARACTERS
    font: str           # file name, one of ALL_FONTS
    fg: str             # ink colour, a key of COLOURS
    bg: str             # background colour, a key of COLOURS, != fg
    scale: float = 0.8  # longest side of the (rotated) ink box, as a fraction of the image size
    dx: float = 0.0     # centre offset to the right, as a fraction of the image size
    dy: float = 0.0     # centre offset downwards, as a fraction of the image size
    angle: float = 0.0  # rotation in degrees, counter-clockwise

    def __post_init__(self):
        _check_choice("char", self.char, CHARACTERS)
        _check_choice("font", self.font, ALL_FONTS)
        _check_choice("fg", self.fg, COLOURS)
        _check_choice("bg", self.bg, COLOURS)
        if self.fg == self.bg:
            raise ValueError(f"fg and bg are both {self.fg!r}; the glyph would be invisible: "
                             f"pick two different colours from {tuple(COLOURS)}")
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"scale={self.scale!r} must be in (0, 1]")

    @property
    def kind(self) -> str:
        return "digit" if self.char.isdigit() else "letter"

    @property
    def caption(self) -> str:
        """The RGB image's caption, e.g. "a red letter K on an orange background"."""
        return glyph_caption(self.char, self.fg, self.bg)

    @property
    def combination(self) -> tuple[str, str, str]:
        """(char, fg, bg): what the caption says, and what held-out prompts hold out."""
        return self.char, self.fg, self.bg

    @property
    def grayscale_caption(self) -> str:
        """The grey-scale image's caption, e.g. "a letter K" (no colours to speak of)."""
        return f"a {self.kind} {self.char}"


@lru_cache(maxsize=None)
def _font(font: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_DIR / font), px)


@lru_cache(maxsize=None)
def _ink(char: str, font: str, px: int) -> Image.Image:
    """The glyph drawn white on black at font size px, cropped to its ink bounding box."""
    f = _font(font, px)
    left, top, right, bottom = f.getbbox(char)
    pad = px // 8  # getbbox is the font's claim; pad, then crop to where the ink really is
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), char, fill=255, font=f)
    return canvas.crop(canvas.getbbox())


def _glyph_mask(spec: GlyphSpec, size: int) -> np.ndarray:
    """Ink coverage of the glyph, (size, size) uint8, 0 = background, 255 = ink."""
    S = SUPERSAMPLE * size
    # font size ~1.5x the canvas: the cached ink is always shrunk, never blown up
    ink = _ink(spec.char, spec.font, int(1.5 * S))
    w, h = ink.size
    # fit the longest side of the rotated ink box (bounding box of a rotated w x h rectangle)
    a = math.radians(spec.angle)
    rot_w = w * abs(math.cos(a)) + h * abs(math.sin(a))
    rot_h = w * abs(math.sin(a)) + h * abs(math.cos(a))
    k = spec.scale * S / max(rot_w, rot_h)
    glyph = ink.resize((max(1, round(w * k)), max(1, round(h * k))), Image.LANCZOS)
    if spec.angle:
        glyph = glyph.rotate(spec.angle, resample=Image.BICUBIC, expand=True)
    canvas = Image.new("L", (S, S), 0)
    cx, cy = S / 2 + spec.dx * S, S / 2 + spec.dy * S
    canvas.paste(glyph, (round(cx - glyph.width / 2), round(cy - glyph.height / 2)))
    return np.asarray(canvas.resize((size, size), Image.BOX))


def _colourise(mask: np.ndarray, fg: str, bg: str) -> np.ndarray:
    """Blend bg -> fg by ink coverage: (H, W) uint8 mask -> (H, W, 3) uint8 RGB."""
    alpha = mask[..., None].astype(np.float32) / 255.0
    fg_rgb, bg_rgb = np.array(COLOURS[fg], np.float32), np.array(COLOURS[bg], np.float32)
    return np.rint(bg_rgb + alpha * (fg_rgb - bg_rgb)).astype(np.uint8)


def render_glyph(spec: GlyphSpec, size: int = 32, grayscale: bool = False) -> Image.Image:
    """Draw spec as a size x size image: RGB fg on bg, or (grayscale) white ink on black, mode "L"."""
    _check_at_least("size", size, MIN_SIZE)
    mask = _glyph_mask(spec, size)
    if grayscale:
        return Image.fromarray(mask, mode="L")
    return Image.fromarray(_colourise(mask, spec.fg, spec.bg), mode="RGB")


def sample_glyph_specs(n: int, seed: int = 0, difficulty: str = "easy",
                       exclude: Collection[tuple[str, str, str]] = ()) -> list[GlyphSpec]:
    """n random glyphs: uniform over characters, fonts and (fg, bg) pairs with fg != bg; a draw whose
    (char, fg, bg) is in ``exclude`` (e.g. ``held_out_combinations()``) is thrown away and redrawn."""
    _check_at_least("n", n, 1)
    _check_choice("difficulty", difficulty, DIFFICULTIES)
    d = DIFFICULTIES[difficulty]
    exclude = frozenset(exclude)
    if set(all_combinations()) <= exclude:
        raise ValueError("exclude holds every (char, fg, bg) combination: nothing is left to draw.")
    rng = random.Random(seed)
    colours = tuple(COLOURS)
    specs = []
    while len(specs) < n:
        fg = rng.choice(colours)
        bg = rng.choice([c for c in colours if c != fg])
        scale = rng.uniform(*d.scale)
        # shrink the offset range for big glyphs so that no ink is cut off at the border
        max_offset = min(d.max_offset, (1.0 - scale) / 2)
        spec = GlyphSpec(
            char=rng.choice(CHARACTERS), font=rng.choice(d.fonts), fg=fg, bg=bg, scale=scale,
            dx=rng.uniform(-max_offset, max_offset), dy=rng.uniform(-max_offset, max_offset),
            angle=rng.uniform(-d.max_angle, d.max_angle) if d.max_angle else 0.0,
        )
        if spec.combination not in exclude:
            specs.append(spec)
    return specs


# ----------------------------------------------------------------------------- held-out prompts

HELD_OUT_SHARE, HELD_OUT_SEED = 0.1, 0  # 10 % of (char, fg, bg) combinations: never in text-to-image training


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (char, fg, bg) a caption can name: 36 characters × 8 × 7 ordered colour pairs = 2016."""
    return [(c, fg, bg) for c in CHARACTERS for fg in COLOURS for bg in COLOURS if fg != bg]


def held_out_combinations(share: float = HELD_OUT_SHARE, seed: int = HELD_OUT_SEED) -> frozenset[tuple[str, str, str]]:
    """round(share · 2016) combinations drawn without replacement by ``random.Random(seed)``.

    Text-to-image training excludes them (``GlyphDataset(…, exclude=held_out_combinations())``);
    lessons 09-10 prompt for them: can the model compose a character and two colours it has only
    seen in other company? Share 0.1, seed 0: 202 combinations.
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"share={share!r} must be in [0, 1): the share of combinations held out.")
    combinations = all_combinations()
    return frozenset(random.Random(seed).sample(combinations, round(share * len(combinations))))


class GlyphDataset(torch.utils.data.Dataset):
    """n captioned glyph images, all rendered once up front (4000 at 32x32: ~1 s on 2 cores).

    images: x_0, (N, C, H, W) float32 in [-1, 1], C = 3 (RGB) or 1 (grey-scale); captions:
    list of N str; chars, fg, bg: (N,) int64 indices into CHARACTERS and list(COLOURS).
    An item is a dict {"image", "caption", "char", "fg", "bg"}, so DataLoader batches it as is.
    ``exclude``: (char, fg, bg) combinations left out, as in ``sample_glyph_specs``.
    """

    def __init__(self, n: int, size: int = 32, seed: int = 0, grayscale: bool = False,
                 difficulty: str = "easy", exclude: Collection[tuple[str, str, str]] = ()):
        _check_at_least("size", size, MIN_SIZE)
        self.specs = sample_glyph_specs(n, seed=seed, difficulty=difficulty, exclude=exclude)
        self.size, self.grayscale, self.difficulty = size, grayscale, difficulty
        masks = np.stack([_glyph_mask(s, size) for s in self.specs])  # (N, H, W) uint8
        if grayscale:
            pixels = torch.from_numpy(masks)[:, None]  # (N, 1, H, W)
        else:
            rgb = np.stack([_colourise(m, s.fg, s.bg) for m, s in zip(masks, self.specs)])
            pixels = torch.from_numpy(rgb).permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
        self.images = pixels.float().div(127.5).sub(1.0).contiguous()  # uint8 -> [-1, 1]
        self.captions = [s.grayscale_caption if grayscale else s.caption for s in self.specs]
        colours = list(COLOURS)
        self.chars = torch.tensor([CHARACTERS.index(s.char) for s in self.specs])
        self.fg = torch.tensor([colours.index(s.fg) for s in self.specs])
        self.bg = torch.tensor([colours.index(s.bg) for s in self.specs])

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": self.captions[i],
                "char": self.chars[i], "fg": self.fg[i], "bg": self.bg[i]}


# ----------------------------------------------------------------------------- photos

# Only the scikit-image samples bundled in its wheel (others download on first use and fail
# offline), plus matplotlib's portrait of Grace Hopper.
PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "grace_hopper",
    "hubble_deep_field", "retina", "coins", "moon", "brick", "grass", "gravel",
)


@lru_cache(maxsize=None)
def _photo_uint8(name: str) -> np.ndarray:
    """The photo as (H, W, 3) uint8; grey photos repeated over the 3 channels."""
    if name == "grace_hopper":
        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
            pixels = np.array(im.convert("RGB"))  # a writable copy, as torch wants
    else:
        pixels = getattr(skimage.data, name)()
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])  # drop alpha where there is one


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0)


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, h, w) -> (3, size, size), antialiased (area-averaging when shrinking)."""
    out = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)[0]
    return out.clamp(-1.0, 1.0)  # bilinear with antialias can overshoot by a hair


def load_photo(name: str, size: int | None = None) -> torch.Tensor:
    """A bundled photo, (3, H, W) in [-1, 1]; with size, centre-cropped square, resized to size."""
    _check_choice("name", name, PHOTOS)
    image = _to_tensor(_photo_uint8(name))
    if size is None:
        return image
    _check_at_least("size", size, MIN_SIZE)
    _, H, W = image.shape
    side = min(H, W)
    top, left = (H - side) // 2, (W - side) // 2
    return _resize(image[:, top:top + side, left:left + side], size)


def photo_patches(n: int, size: int = 32, seed: int = 0,
                  names: tuple[str, ...] | list[str] | None = None) -> torch.Tensor:
    """n random square crops, (n, 3, size, size) in [-1, 1], for training the VAE on photos.

    Each patch: a photo chosen uniformly, a crop side log-uniform between size (native
    resolution, fine texture) and the photo's short side (the whole scene), at a uniform place.
    """
    _check_at_least("n", n, 1)
    _check_at_least("size", size, MIN_SIZE)
    names = PHOTOS if names is None else tuple(names)
    if not names:
        raise ValueError(f"names=() is empty; give at least one of {PHOTOS}, or None for all")
    for name in names:
        _check_choice("names", name, PHOTOS)
    rng = np.random.default_rng(seed)
    patches = torch.empty(n, 3, size, size)
    for i in range(n):
        pixels = _photo_uint8(names[rng.integers(len(names))])
        H, W, _ = pixels.shape
        short = min(H, W)
        side = min(short, round(math.exp(rng.uniform(math.log(size), math.log(short)))))
        top, left = rng.integers(H - side + 1), rng.integers(W - side + 1)
        patches[i] = _resize(_to_tensor(pixels[top:top + side, left:left + side]), size)
    return patches


# ----------------------------------------------------------------------------- autoencoder data

HELD_OUT_PHOTOS = ("coffee", "rocket")  # never shown to the course's autoencoders: test generalisation
TRAIN_PHOTOS = tuple(name for name in PHOTOS if name not in HELD_OUT_PHOTOS)


def autoencoder_images(n: int, size: int = 32, seed: int = 0, photo_fraction: float = 0.5,
                       photos: tuple[str, ...] = TRAIN_PHOTOS) -> torch.Tensor:
    """What the course's VAEs learn to compress: RGB glyphs and photo patches, shuffled, (n, 3, size, size).

    round(n · photo_fraction) patches come from ``photo_patches(…, names=photos)``, the rest from
    ``GlyphDataset(…, seed=seed)``; the default photos leave out HELD_OUT_PHOTOS.
    """
    _check_at_least("n", n, 1)
    if not 0.0 <= photo_fraction <= 1.0:
        raise ValueError(f"photo_fraction={photo_fraction} must be in [0, 1].")
    n_photos = round(n * photo_fraction)
    parts = [photo_patches(n_photos, size, seed=seed, names=photos)] if n_photos else []
    if n - n_photos:
        parts.append(GlyphDataset(n - n_photos, size, seed=seed).images)
    images = torch.cat(parts)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return images[order]
