"""How good are generated images? Prompt accuracy, an FID-style distance, PSNR and SSIM.

* ``glyph_accuracy``: did the model draw the letter and colours its prompt asked for? A small
  CNN, ``GlyphClassifier``, trained on the same glyph generator (``scripts/train_classifier.py``),
  reads character, ink colour and background colour of each image.
* ``glyph_fid``: the Fréchet distance (Heusel et al. 2017, eq. 6) between Gaussians fitted to the
  classifier's features of two image sets. An FID-*style* metric, not Inception-FID (see its
  docstring before quoting a number).
* ``glyph_kid``: the kernel distance (KID, Bińkowski et al. 2018) on the same features: an unbiased
  estimate of the squared MMD with a cubic polynomial kernel, so that, unlike FID, its expected value
  does not depend on the number of samples (0 for two sets from one distribution, up to noise).
* ``psnr`` and ``ssim`` (Wang et al. 2004): how close a reconstruction is to its original, e.g.
  the VAE's output in lesson 06.

Images are NCHW tensors in [-1, 1]; the classifier takes 32×32, RGB or grey-scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoints import load_model
from .config import ASSETS, get_device
from .data import CHARACTERS, COLOURS

DEFAULT_CLASSIFIER_PATH = ASSETS / "checkpoints" / "glyph_classifier.safetensors"  # trained by scripts/train_classifier.py
IMAGE_SIZE = 32  # the classifier was trained on 32×32 glyphs only
HEADS = ("char", "fg", "bg")  # what the classifier reads: character, ink colour, background colour

# SSIM constants of Wang et al. 2004, section III (also skimage's with gaussian_weights=True)
SSIM_SIGMA = 1.5  # standard deviation of the Gaussian window
SSIM_WIN_SIZE = 11  # 11×11 window: radius int(3.5 σ + 0.5) = 5, as skimage truncates at 3.5 σ
SSIM_K1, SSIM_K2 = 0.01, 0.03  # C1 = (K1 L)², C2 = (K2 L)², L = data_range


# ----------------------------------------------------------------------------- classifier


@dataclass(frozen=True)
class GlyphClassifierConfig:
    """A plain CNN: stages of 3×3 conv + GroupNorm + SiLU, each followed by a 2×2 max-pool; the
    last map (4×4 for 3 stages) is flattened, not averaged: where the strokes are is what tells
    glyphs apart (with global average pooling, character loss sat at chance for ~300 steps in a
    trial run; flattened, for ~30)."""

    in_channels: int = 3  # RGB; grey-scale input is repeated to 3 channels (white ink on black)
    block_out_channels: tuple[int, ...] = (32, 64, 96)  # one stage each: 32 → 16 → 8 → 4 px
    layers_per_block: int = 2  # conv layers per stage
    norm_num_groups: int = 8  # GroupNorm has no batch statistics: same output in train and eval
    feature_dim: int = 64  # D of features(); a Fréchet distance needs more than D samples
    num_characters: int = len(CHARACTERS)  # 36 classes, CHARACTERS order
    num_colours: int = len(COLOURS)  # 8 classes, COLOURS order

    @classmethod
    def from_dict(cls, d: dict) -> "GlyphClassifierConfig":
        """Inverse of ``dataclasses.asdict`` (lists, as JSON gives them, become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class GlyphClassifier(nn.Module):
    """Reads a glyph's character, ink (fg) colour and background (bg) colour.

    ``forward(x)`` returns logits ``{"char": (B, 36), "fg": (B, 8), "bg": (B, 8)}``;
    ``features(x)`` the penultimate (B, D) features that ``glyph_fid`` compares.
    """

    config_class = GlyphClassifierConfig  # how checkpoints.load_model rebuilds the config from a header

    def __init__(self, config: GlyphClassifierConfig = GlyphClassifierConfig()):
        super().__init__()
        self.config = config
        layers, ch = [], config.in_channels
        for out_ch in config.block_out_channels:
            for _ in range(config.layers_per_block):
                layers += [nn.Conv2d(ch, out_ch, 3, padding=1), nn.GroupNorm(config.norm_num_groups, out_ch), nn.SiLU()]
                ch = out_ch
            layers.append(nn.MaxPool2d(2))  # halve the resolution after each stage
        self.body = nn.Sequential(*layers)
        side = IMAGE_SIZE // 2 ** len(config.block_out_channels)  # 4
        self.neck = nn.Sequential(nn.Linear(ch * side * side, config.feature_dim), nn.SiLU())
        self.char_head = nn.Linear(config.feature_dim, config.num_characters)
        self.fg_head = nn.Linear(config.feature_dim, config.num_colours)
        self.bg_head = nn.Linear(config.feature_dim, config.num_colours)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, (B, D), of images x: (B, 1 or 3, 32, 32) in [-1, 1]."""
        _check_images("x", x, self.config.in_channels)
        if x.shape[1] == 1:
            x = x.expand(-1, self.config.in_channels, -1, -1)  # grey = white ink on black in RGB
        h = self.body(x).flatten(1)  # (B, C, 4, 4) -> (B, C·16)
        return self.neck(h)  # (B, D)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)  # (B, D)
        return {"char": self.char_head(h), "fg": self.fg_head(h), "bg": self.bg_head(h)}


def _check_images(arg: str, images, in_channels: int = 3) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor of images, got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] not in (1, in_channels):
        raise ValueError(f"{arg} must be (B, C, H, W) with C = 1 or {in_channels}, got shape {tuple(images.shape)}; "
                         "add a batch axis with image[None] for a single image.")
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{arg} must be {IMAGE_SIZE}×{IMAGE_SIZE} images (the classifier's training size), got "
                         f"{tuple(images.shape[-2:])}; resize with F.interpolate(images, size={IMAGE_SIZE}).")


def load_glyph_classifier(path: str | Path = DEFAULT_CLASSIFIER_PATH,
                          device: str | torch.device | None = None) -> GlyphClassifier:
    """The trained classifier from a safetensors file (never unpickled), in eval mode on device."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier weights at {path}; train them with "
                                "`python scripts/train_classifier.py`.")
    return load_model(GlyphClassifier, path, get_device() if device is None else device)


# ----------------------------------------------------------------------------- prompt accuracy


@torch.no_grad()
def _batched(fn, classifier: GlyphClassifier, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fn(batch) over images, batch by batch on the classifier's device, concatenated on the CPU."""
    device = next(classifier.parameters()).device
    return torch.cat([fn(batch.to(device=device, dtype=torch.float32)).cpu() for batch in images.split(batch_size)])


def predict(images: torch.Tensor, classifier: GlyphClassifier | None = None,
            batch_size: int = 256) -> dict[str, torch.Tensor]:
    """What the classifier reads in images (N, 1 or 3, 32, 32) in [-1, 1]: (N,) int64 indices
    ``{"char": into CHARACTERS, "fg": into COLOURS, "bg": into COLOURS}``."""
    _check_images("images", images)
    classifier = load_glyph_classifier() if classifier is None else classifier
    def read(x: torch.Tensor) -> torch.Tensor:
        logits = classifier(x)
        return torch.stack([logits[head].argmax(-1) for head in HEADS], -1)  # (B, 3)

    labels = _batched(read, classifier, images, batch_size)  # (N, 3)
    return {head: labels[:, i] for i, head in enumerate(HEADS)}


def _as_labels(arg: str, labels, names: list[str], n: int) -> torch.Tensor:
    """Labels as (n,) int64: a tensor or list of indices or names; one name/index for all n."""
    if isinstance(labels, (str, int)):
        labels = [labels] * n
    if not isinstance(labels, torch.Tensor):
        unknown = [v for v in labels if isinstance(v, str) and v not in names]
        if unknown:
            raise ValueError(f"{arg} has unknown names {unknown[:5]}; use indices or names from {names}.")
        labels = torch.tensor([names.index(v) if isinstance(v, str) else v for v in labels])
    labels = labels.long().cpu()
    if labels.shape != (n,):
        raise ValueError(f"{arg} must hold one label per image, shape ({n},), got {tuple(labels.shape)}.")
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"{arg} indices must be in [0, {len(names)}), got [{labels.min()}, {labels.max()}].")
    return labels


def glyph_accuracy(images: torch.Tensor, chars=None, fg=None, bg=None,
                   classifier: GlyphClassifier | None = None) -> dict[str, float]:
    """Fraction of images whose character / ink colour / background colour is the one asked for.

    images: (N, 1 or 3, 32, 32) in [-1, 1]. chars, fg, bg: what each image's prompt asked for, as
    (N,) indices into CHARACTERS / COLOURS (e.g. ``GlyphDataset.chars``), a list of names
    ("K", "red"), or one name for all. Returns a float per label given and ``"all"``: the fraction
    with every given label right (prompt accuracy).
    """
    _check_images("images", images)
    asked = {"char": ("chars", chars, CHARACTERS), "fg": ("fg", fg, COLOURS), "bg": ("bg", bg, COLOURS)}
    labels = {head: _as_labels(arg, value, list(names), len(images))
              for head, (arg, value, names) in asked.items() if value is not None}
    if not labels:
        raise ValueError("give at least one of chars, fg, bg: the labels the images were asked for.")
    predicted = predict(images, classifier)
    right = {head: predicted[head] == y for head, y in labels.items()}  # (N,) bool each
    accuracy = {h: r.float().mean().item() for h, r in right.items()}
    accuracy["all"] = torch.stack(list(right.values())).all(0).float().mean().item()
    return accuracy


RECOGNISABLE_THRESHOLD = 0.9  # a sample "reads as" a character when the classifier gives it ≥ 90%


@torch.no_grad()
def recognisable(images: torch.Tensor, classifier: GlyphClassifier | None = None,
                 threshold: float = RECOGNISABLE_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """Which images read clearly as some character, for unconditional samples (no prompt to check).

    Returns (mask, chars): (N,) bool, True where the classifier's top character probability is
    ≥ ``threshold``, and (N,) int64, that top character (index into CHARACTERS).
    """
    _check_images("images", images)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must be in (0, 1].")
    classifier = load_glyph_classifier() if classifier is None else classifier
    probs = _batched(lambda x: classifier(x)["char"].softmax(-1), classifier, images, 256)  # (N, 36)
    confidence, chars = probs.max(-1)
    return confidence >= threshold, chars


# ----------------------------------------------------------------------------- Fréchet distance


def _trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """Tr((Σ_a Σ_b)^{1/2}) of symmetric PSD matrices, stably.

    Σ_a Σ_b is similar to the symmetric PSD M = Σ_a^{1/2} Σ_b Σ_a^{1/2} (same eigenvalues), so the
    trace is Σ √λ_i(M): two symmetric eigen-decompositions, no complex numbers, no sqrtm.
    """
    eigval, eigvec = np.linalg.eigh(sigma_a)
    sqrt_a = (eigvec * np.sqrt(np.clip(eigval, 0, None))) @ eigvec.T  # Σ_a^{1/2}
    m = sqrt_a @ sigma_b @ sqrt_a
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance_gaussians(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """d² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})  (Heusel et al. 2017, eq. 6).

    mu: (D,), sigma: (D, D) symmetric PSD; computed in float64.
    """
    mu_a, sigma_a, mu_b, sigma_b = (np.asarray(v, np.float64) for v in (mu_a, sigma_a, mu_b, sigma_b))
    D = len(mu_a)
    for arg, value, shape in (("mu_a", mu_a, (D,)), ("mu_b", mu_b, (D,)),
                              ("sigma_a", sigma_a, (D, D)), ("sigma_b", sigma_b, (D, D))):
        if value.shape != shape:
            raise ValueError(f"{arg} must have shape {shape} (D = len(mu_a)), got {value.shape}.")
    diff = mu_a - mu_b
    d2 = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * _trace_sqrt_product(sigma_a, sigma_b)
    return max(float(d2), 0.0)  # rounding can leave -1e-12 for identical Gaussians


def _check_features(arg: str, features, min_n: int | None = None) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise ValueError(f"{arg} must be (N, D) features, got shape {features.shape}.")
    N, D = features.shape
    if min_n is not None:
        if N < min_n:
            raise ValueError(f"{arg} has N = {N} samples; an unbiased MMD needs at least {min_n}.")
        return features
    if N <= D:
        raise ValueError(f"{arg} has N = {N} samples of dimension D = {D}: the covariance of N ≤ D samples is "
                         f"singular; give at least {D + 1} (better several hundred: small N biases the distance up).")
    return features


def _feature_pair(features_a, features_b, min_n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    a, b = _check_features("features_a", features_a, min_n), _check_features("features_b", features_b, min_n)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a and features_b must have the same D, got {a.shape[1]} and {b.shape[1]}.")
    return a, b


def frechet_distance(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    μ = sample mean, Σ = sample covariance (N − 1 normalised, as pytorch-fid); see
    ``frechet_distance_gaussians`` for the formula. Symmetric; 0 for identical sets.
    """
    a, b = _feature_pair(features_a, features_b)
    return frechet_distance_gaussians(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def glyph_fid(generated: torch.Tensor, reference: torch.Tensor, classifier: GlyphClassifier | None = None,
              batch_size: int = 256) -> float:
    """Fréchet distance between GlyphClassifier features of two image sets, (N, 1 or 3, 32, 32) in [-1, 1].

    An FID-*style* metric with a small in-domain classifier, not Inception-FID: its numbers are
    not comparable with the FIDs in papers, they depend on the sample count (biased upwards at
    small N; compare runs at equal N, a few hundred images or more; N must exceed D = 64), and
    they only measure what the classifier's features see (letter, colours, rough shape), not
    everything a person would notice.
    """
    classifier = load_glyph_classifier() if classifier is None else classifier
    D = classifier.config.feature_dim
    for arg, images in (("generated", generated), ("reference", reference)):
        _check_images(arg, images)
        if len(images) <= D:  # fail before running the classifier
            raise ValueError(f"{arg} has {len(images)} images; a Fréchet distance of {D}-d features needs at least "
                             f"{D + 1} (better several hundred).")
    return frechet_distance(_batched(classifier.features, classifier, generated, batch_size),
                            _batched(classifier.features, classifier, reference, batch_size))


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KID's kernel k(x, y) = (xᵀy / D + 1)³ between rows of a (N, D) and b (M, D): (N, M)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def mmd2_unbiased(features_a, features_b) -> float:
    """Unbiased squared MMD (Gretton et al. 2012, Lemma 6) with KID's ``polynomial_kernel``:

        MMD²_u = Σ_{i≠j} k(a_i, a_j) / (m(m−1)) + Σ_{i≠j} k(b_i, b_j) / (n(n−1)) − 2 Σ_{i,j} k(a_i, b_j) / (mn)

    Leaving the diagonals k(x_i, x_i) out of the first two sums makes it unbiased (a single estimate can be < 0).
    """
    a, b = map(torch.as_tensor, _feature_pair(features_a, features_b, min_n=2))
    k_aa, k_bb, m, n = polynomial_kernel(a, a), polynomial_kernel(b, b), len(a), len(b)
    within = (k_aa.sum() - k_aa.trace()) / (m * (m - 1)) + (k_bb.sum() - k_bb.trace()) / (n * (n - 1))
    return (within - 2 * polynomial_kernel(a, b).mean()).item()


def kernel_distance(features_a, features_b, num_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of ``mmd2_unbiased`` over ``num_subsets`` random subsets of
    ``min(subset_size, N_a // 2, N_b // 2)`` rows of each set (torch-fidelity's method; at most half of
    each set, so that the subsets differ and their spread says how noisy the estimate is)."""
    a, b = _feature_pair(features_a, features_b, min_n=4)
    size = min(subset_size, len(a) // 2, len(b) // 2)
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def glyph_kid(generated: torch.Tensor, reference: torch.Tensor, classifier: GlyphClassifier | None = None,
              batch_size: int = 256, num_subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
    """KID (mean, std over subsets) of GlyphClassifier features of two image sets, (N, 1 or 3, 32, 32) in
    [-1, 1]: real vs real scores about 0 at any N (``glyph_fid`` is biased up at small N). Not Inception's."""
    classifier = load_glyph_classifier() if classifier is None else classifier
    for arg, images in (("generated", generated), ("reference", reference)):
        _check_images(arg, images)
    return kernel_distance(_batched(classifier.features, classifier, generated, batch_size),
                           _batched(classifier.features, classifier, reference, batch_size),
                           num_subsets=num_subsets, subset_size=subset_size)


# ----------------------------------------------------------------------------- PSNR and SSIM


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if not (isinstance(a, torch.Tensor) and a.ndim == 4):
        raise ValueError(f"a must be a (B, C, H, W) tensor, got {getattr(a, 'shape', type(a).__name__)}.")
    if not isinstance(b, torch.Tensor) or a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (B, C, H, W), got {tuple(a.shape)} and "
                         f"{getattr(b, 'shape', type(b).__name__)}.")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, (B,) in dB: 10 log10(L² / MSE), L = data_range.

    a, b: (B, C, H, W); L = 2 for images in [-1, 1]. Identical images give +inf (MSE = 0).
    """
    _check_pair(a, b)
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32  # MPS has no float64
    mse = (a.to(dtype) - b.to(dtype)).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Structural similarity per image, (B,), averaged over channels and pixels (Wang et al. 2004).

    SSIM(x, y) = (2 μ_x μ_y + C1)(2 σ_xy + C2) / ((μ_x² + μ_y² + C1)(σ_x² + σ_y² + C2))   (eq. 13)

    with local statistics under an 11×11 Gaussian window (σ = 1.5), C1 = (0.01 L)², C2 = (0.03 L)²,
    L = data_range (2 for [-1, 1]). Only windows fully inside the image count, as in skimage's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
    a, b: (B, C, H, W) with H, W ≥ 11. 1 means identical.
    """
    _check_pair(a, b)
    B, C, H, W = a.shape
    if min(H, W) < SSIM_WIN_SIZE:
        raise ValueError(f"SSIM needs images of at least {SSIM_WIN_SIZE}×{SSIM_WIN_SIZE}, got {H}×{W}.")
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.to(dtype).reshape(B * C, 1, H, W), b.to(dtype).reshape(B * C, 1, H, W)
    r = torch.arange(SSIM_WIN_SIZE, dtype=dtype, device=a.device) - SSIM_WIN_SIZE // 2
    g = torch.exp(-0.5 * (r / SSIM_SIGMA) ** 2)
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]  # (1, 1, 11, 11), sums to 1
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), window)  # no padding: only whole windows
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.chunk(5)  # each (B*C, 1, H-10, W-10): local E[·]
    var_x, var_y, cov_xy = e_xx - mu_x**2, e_yy - mu_y**2, e_xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(B, -1).mean(1)  # mean over channels and pixels


def reconstruction_metrics(originals: torch.Tensor, reconstructions: torch.Tensor,
                           classifier: GlyphClassifier | None = None) -> dict[str, float]:
    """How well an autoencoder kept its inputs: mean PSNR (dB) and SSIM, and for glyphs an rFID-style score.

    ``rfid`` is ``glyph_fid(reconstructions, originals)``, the course's stand-in for the LDM
    paper's R-FID (Inception-FID of reconstructions, Table 8); it is computed only when a
    ``classifier`` is given (glyph images, more than 64 of them).
    """
    out = {"psnr": psnr(reconstructions, originals).mean().item(),
           "ssim": ssim(reconstructions, originals).mean().item()}
    if classifier is not None:
        out["rfid"] = glyph_fid(reconstructions, originals, classifier)
    return out


@torch.no_grad()
def recognisable_floor(classifier: GlyphClassifier | None = None, n: int = 1000, channels: int = 3,
                       seed: int = 0) -> float:
    """The share of non-glyphs that ``recognisable`` passes: images of uniform noise in [-1, 1],
    (n, channels, 32, 32), drawn with ``seed``. A sample set scoring near this floor draws no glyphs."""
    if n < 1 or channels not in (1, 3):
        raise ValueError(f"n must be ≥ 1 and channels 1 (grey) or 3 (RGB), got n={n}, channels={channels}.")
    noise = torch.rand(n, channels, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return recognisable(noise, classifier)[0].float().mean().item()
