"""Tests of minisd.metrics: the shipped classifier reads held-out glyphs, every metric meets its
closed form (and skimage's SSIM), and bad input or a mismatched checkpoint fails clearly."""

import hashlib
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from minisd.checkpoints import save_tensors
from minisd.data import GlyphDataset
from minisd.metrics import (
    DEFAULT_CLASSIFIER_PATH, GlyphClassifier, GlyphClassifierConfig, frechet_distance,
    frechet_distance_gaussians, glyph_accuracy, glyph_fid, glyph_kid, kernel_distance, load_glyph_classifier,
    mmd2_unbiased, predict, psnr, recognisable, reconstruction_metrics, ssim,
)

TEST_SEED = 2  # held out: training uses seeds >= 1000 and evaluates on seed 1


@pytest.fixture(scope="module")
def classifier() -> GlyphClassifier:
    return load_glyph_classifier(device="cpu")


@pytest.fixture(scope="module")
def easy() -> GlyphDataset:
    return GlyphDataset(500, seed=TEST_SEED)


def with_moments(mean: np.ndarray, std: np.ndarray, n: int = 300, seed: int = 0) -> np.ndarray:
    """n samples whose sample mean is exactly mean and sample covariance exactly diag(std²)."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance = I
    return z * std + mean


# ----------------------------------------------------------------------------- the classifier


def test_classifier_shapes_size_and_grayscale_input():
    model = GlyphClassifier()
    assert 200_000 <= sum(p.numel() for p in model.parameters()) <= 400_000
    logits = model(torch.zeros(2, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"char": (2, 36), "fg": (2, 8), "bg": (2, 8)}
    grey = torch.rand(2, 1, 32, 32) * 2 - 1
    assert model.features(grey).shape == (2, GlyphClassifierConfig().feature_dim)
    torch.testing.assert_close(model.features(grey), model.features(grey.expand(-1, 3, -1, -1)))


def test_shipped_checkpoint_card_and_size():
    card = json.loads(DEFAULT_CLASSIFIER_PATH.with_suffix(".json").read_text())
    data = DEFAULT_CLASSIFIER_PATH.read_bytes()
    assert len(data) < 2_000_000 and card["sha256"] == hashlib.sha256(data).hexdigest()
    assert card["config"]["feature_dim"] == GlyphClassifierConfig().feature_dim
    assert card["metrics"]["easy_rgb"]["char"] >= 0.99


def test_classifier_reads_held_out_easy_glyphs(classifier, easy):
    # the errors left are DejaVu Sans Mono's O read as 0: at 32×32 it nearly equals DejaVu Sans's 0
    accuracy = glyph_accuracy(easy.images, easy.chars, easy.fg, easy.bg, classifier=classifier)
    assert accuracy["char"] >= 0.98 and accuracy["fg"] >= 0.98 and accuracy["bg"] >= 0.98
    assert accuracy["all"] >= 0.97


def test_classifier_reads_grayscale_glyphs_as_white_on_black(classifier):
    grey = GlyphDataset(1000, seed=TEST_SEED, grayscale=True)
    accuracy = glyph_accuracy(grey.images, grey.chars, fg="white", bg="black", classifier=classifier)
    assert accuracy["char"] >= 0.98 and accuracy["fg"] >= 0.98 and accuracy["bg"] >= 0.98


def test_predict_and_label_forms_agree(classifier, easy):
    images = easy.images[:40]
    predicted = predict(images, classifier=classifier)
    assert all(predicted[h].shape == (40,) and predicted[h].dtype == torch.int64 for h in ("char", "fg", "bg"))
    names = [easy.specs[i].char for i in range(40)]
    by_name = glyph_accuracy(images, chars=names, classifier=classifier)
    assert by_name == glyph_accuracy(images, chars=easy.chars[:40], classifier=classifier)
    assert set(by_name) == {"char", "all"}


# ----------------------------------------------------------------------------- loading


def test_mismatched_checkpoint_names_the_keys(tmp_path, classifier):
    state = {k: v.clone() for k, v in classifier.state_dict().items()}
    del state["char_head.bias"]
    state["fg_head.weight"] = torch.zeros(5, 64)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_tensors(state, path, {"model_class": "GlyphClassifier", "model_config": asdict(classifier.config)})
    with pytest.raises(ValueError, match=r"char_head\.bias.*extra\.weight.*fg_head\.weight.*\(5, 64\)"):
        load_glyph_classifier(path, device="cpu")


def test_config_in_metadata_must_match_weights(tmp_path, classifier):
    path = tmp_path / "wrong_config.safetensors"
    header = {"model_class": "GlyphClassifier", "model_config": asdict(classifier.config) | {"feature_dim": 32}}
    save_tensors(classifier.state_dict(), path, header)
    with pytest.raises(ValueError, match=r"neck\.0\.weight: model \(32, 1536\) vs file \(64, 1536\)"):
        load_glyph_classifier(path, device="cpu")
    save_tensors({"x": torch.zeros(1)}, path, {"model_class": "GlyphClassifier", "model_config": {"width": 3}})
    with pytest.raises(ValueError, match="unknown config fields.*width"):
        load_glyph_classifier(path, device="cpu")
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        load_glyph_classifier(tmp_path / "absent.safetensors")


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_identical_sets_is_zero():
    features = np.random.default_rng(0).standard_normal((200, 16))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_diagonal_closed_form_and_symmetry():
    rng = np.random.default_rng(1)
    mu_1, mu_2 = rng.normal(size=8), rng.normal(size=8)
    std_1, std_2 = rng.uniform(0.5, 2, size=8), rng.uniform(0.5, 2, size=8)
    a, b = with_moments(mu_1, std_1, seed=2), with_moments(mu_2, std_2, n=150, seed=3)
    expected = ((mu_1 - mu_2) ** 2).sum() + ((std_1 - std_2) ** 2).sum()  # ‖μ₁−μ₂‖² + Σ(σ₁−σ₂)²
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    swapped = frechet_distance(torch.from_numpy(b).float(), torch.from_numpy(a).float())  # tensors work too
    assert swapped == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_gaussians_matches_scipy_sqrtm():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 10)), rng.normal(size=(10, 10))
    sigma_a, sigma_b = x @ x.T, y @ y.T + np.eye(10)  # two full, non-commuting covariances
    mu_a, mu_b = rng.normal(size=10), rng.normal(size=10)
    reference = (np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a + sigma_b)
                 - 2 * np.trace(scipy.linalg.sqrtm(sigma_a @ sigma_b).real))
    assert frechet_distance_gaussians(mu_a, sigma_a, mu_b, sigma_b) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance_gaussians(mu_b, sigma_b, mu_a, sigma_a) == pytest.approx(reference, rel=1e-8)


def test_frechet_distance_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"features_b has N = 64 samples.*at least 65"):
        frechet_distance(rng.normal(size=(100, 64)), rng.normal(size=(64, 64)))
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(rng.normal(size=(100, 8)), rng.normal(size=(100, 9)))
    with pytest.raises(ValueError, match="features_a must be"):
        frechet_distance(rng.normal(size=100), rng.normal(size=(100, 9)))
    with pytest.raises(ValueError, match="sigma_b"):
        frechet_distance_gaussians(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_glyph_fid_real_vs_real_is_small_vs_noise_and_blur_large(classifier, easy):
    other = GlyphDataset(500, seed=TEST_SEED + 1).images
    noise = torch.rand(500, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred = F.interpolate(F.avg_pool2d(easy.images, 4), size=32, mode="bilinear")  # 8×8 detail only
    real = glyph_fid(easy.images, other, classifier=classifier)
    assert 0 <= real < 150  # measured: 52 at N = 500 (small-N bias; 14 at N = 2000)
    assert glyph_fid(noise, other, classifier=classifier) > 20 * real  # measured: 41x
    assert glyph_fid(blurred, other, classifier=classifier) > 5 * real  # measured: 12x
    with pytest.raises(ValueError, match="generated has 64 images.*at least 65"):
        glyph_fid(easy.images[:64], other, classifier=classifier)


def test_mmd2_unbiased_matches_the_double_sum_and_is_unbiased():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 0.5
    k = lambda x, y: (x @ y / 3 + 1) ** 3  # noqa: E731 - KID's kernel, written out
    by_hand = (sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
               + sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
               - 2 * sum(k(x, y) for x in a for y in b) / (7 * 5))
    assert mmd2_unbiased(a, b) == pytest.approx(by_hand, rel=1e-12)
    # same distribution: the unbiased estimate averages to 0 at a small N, where the version that keeps
    # the diagonals (a V-statistic) sits well above it
    draws = [(rng.standard_normal((20, 4)), rng.standard_normal((20, 4))) for _ in range(300)]
    unbiased = np.mean([mmd2_unbiased(x, y) for x, y in draws])
    biased = np.mean([((x @ x.T / 4 + 1) ** 3).mean() + ((y @ y.T / 4 + 1) ** 3).mean() - 2 * ((x @ y.T / 4 + 1) ** 3).mean()
                      for x, y in draws])
    assert abs(unbiased) < 0.1 * biased, (unbiased, biased)
    with pytest.raises(ValueError, match="features_a and features_b must have the same D"):
        mmd2_unbiased(a, b[:, :2])


def test_kernel_distance_subsets_and_glyph_kid(classifier, easy):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
    mean, std = kernel_distance(x, y, num_subsets=20, subset_size=1000)  # subsets of N / 2 = 200: they differ
    assert std > 0 and abs(mean) < 3 * std
    assert kernel_distance(x, y + 1, num_subsets=20)[0] > 20 * std
    other = GlyphDataset(500, seed=TEST_SEED + 1).images
    noise = torch.rand(500, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real, real_std = glyph_kid(easy.images, other, classifier=classifier)
    assert abs(real) < 3 * real_std  # measured: -1.8e3 ± 1.9e3, i.e. 0 within its noise
    assert glyph_kid(noise, other, classifier=classifier)[0] > 100 * real_std  # measured: 5.1e5


# ----------------------------------------------------------------------------- PSNR and SSIM


def test_psnr_closed_cases():
    a = torch.zeros(3, 3, 8, 8)
    b = a + torch.tensor([0.0, 0.1, 0.2])[:, None, None, None]  # MSE 0, 0.01, 0.04 per image
    result = psnr(a, b)  # data_range 2: 10 log10(4 / MSE)
    assert result[0] == math.inf
    torch.testing.assert_close(result[1:], torch.tensor([10 * math.log10(400), 10 * math.log10(100)]))
    assert psnr(a[1:], b[1:], data_range=1.0)[1].item() == pytest.approx(10 * math.log10(25), rel=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_skimage(channels, easy):
    g = torch.Generator().manual_seed(0)
    x = easy.images[:4, :channels].double()
    y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    ours = ssim(x.float(), y.float())
    for i in range(4):
        reference = structural_similarity(
            x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy(), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=2.0, channel_axis=2)
        assert ours[i].item() == pytest.approx(reference, abs=1e-4)
    torch.testing.assert_close(ssim(x, x), torch.ones(4, dtype=torch.float64))


def test_bad_shapes_raise_value_error(classifier, easy):
    with pytest.raises(ValueError, match="a and b must have the same shape"):
        psnr(torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="images must be .* C = 1 or 3"):
        predict(torch.zeros(2, 2, 32, 32), classifier=classifier)
    with pytest.raises(ValueError, match="32×32"):
        predict(torch.zeros(2, 3, 64, 64), classifier=classifier)
    with pytest.raises(ValueError, match=r"chars must hold one label per image, shape \(4,\)"):
        glyph_accuracy(easy.images[:4], chars=easy.chars[:3], classifier=classifier)
    with pytest.raises(ValueError, match="fg has unknown names.*magenta"):
        glyph_accuracy(easy.images[:2], fg=["red", "magenta"], classifier=classifier)
    with pytest.raises(ValueError, match="at least one of chars, fg, bg"):
        glyph_accuracy(easy.images[:2], classifier=classifier)


def test_recognisable_flags_real_glyphs_and_not_noise(classifier, easy):
    real = easy.images[:64]
    mask, chars = recognisable(real, classifier)
    assert mask.shape == chars.shape == (64,) and mask.dtype == torch.bool
    assert mask.float().mean() > 0.9
    assert (chars[mask] == easy.chars[:64][mask]).float().mean() > 0.95  # confident and right
    flat = torch.zeros(64, 3, 32, 32)  # a blank grey square is no character
    assert recognisable(flat, classifier)[0].float().mean() < 0.5
    with pytest.raises(ValueError, match="threshold"):
        recognisable(real, classifier, threshold=0.0)


def test_reconstruction_metrics_perfect_and_degraded(classifier, easy):
    x = easy.images[:80]
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1)
    perfect, degraded = reconstruction_metrics(x, x.clone(), classifier), reconstruction_metrics(x, blurred, classifier)
    assert math.isinf(perfect["psnr"]) and perfect["ssim"] == pytest.approx(1.0) and abs(perfect["rfid"]) < 1e-6
    assert degraded["psnr"] < 40 and degraded["ssim"] < 1 and degraded["rfid"] > 1
    assert "rfid" not in reconstruction_metrics(x, blurred)  # no classifier: pixels only
