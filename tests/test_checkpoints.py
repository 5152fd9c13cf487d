"""Every shipped checkpoint: a card beside it, the file the card describes, within the size budget,
and loadable into the class and config its card names."""

import hashlib
import json

import pytest
import torch

from minisd.config import ASSETS
from minisd.nn import UNet
from minisd.nn.vae import AutoencoderKL, PixelSpace
from minisd.train import read_metadata

CHECKPOINTS = sorted((ASSETS / "checkpoints").glob("*.safetensors"))
MAX_FILE, MAX_TOTAL = 10_000_000, 60_000_000  # DESIGN.md: each under 10 MB, all under 60 MB


def test_size_budget():
    sizes = {p.name: p.stat().st_size for p in CHECKPOINTS}
    assert all(size < MAX_FILE for size in sizes.values()), sizes
    assert sum(sizes.values()) < MAX_TOTAL, sum(sizes.values())


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.stem)
def test_card_matches_file(path):
    card = json.loads(path.with_suffix(".json").read_text())
    data = path.read_bytes()
    assert card["sha256"] == hashlib.sha256(data).hexdigest()
    for field in ("command", "seed", "steps", "metrics" if "metrics" in card else "curve"):
        assert card.get(field) not in (None, "", []), f"{path.stem}: card lacks {field}"


@pytest.mark.parametrize("path", [p for p in CHECKPOINTS if p.stem.startswith(("ae_", "vae_", "ldm_"))], ids=lambda p: p.stem)
def test_course_models_load_with_their_cards_config(path):
    card = json.loads(path.with_suffix(".json").read_text())
    cls = UNet if path.stem.startswith("ldm_") else AutoencoderKL
    model = cls.from_pretrained(path)
    assert model.config.to_dict() == {k: tuple(v) if isinstance(v, list) else v for k, v in card["model_config"].items()}
    assert read_metadata(path)["model_class"] == cls.__name__
    if cls is AutoencoderKL:  # the scaling factor makes its training latents about unit-variance
        from minisd.data import GlyphDataset, autoencoder_images
        from minisd.metrics import psnr

        latents = model.encode_latents(autoencoder_images(256, seed=0))
        assert 0.8 < latents.std().item() < 1.2  # measured on posterior samples (as SD); these are means
        # the card's PSNR was measured on 1000 held-out glyphs (seed 10001); re-measure it on the first 128
        glyphs = GlyphDataset(128, seed=10_001).images
        measured = psnr(glyphs, model.reconstruct(glyphs)).mean().item()
        assert measured == pytest.approx(card["metrics"]["glyphs"]["psnr"], abs=0.75)  # 128 of the 1000: ±0.75 dB
        return
    if card["autoencoder"].get("pixels"):  # the study's f = 1: pixel-space diffusion, no autoencoder
        assert card["autoencoder"]["file"] is None
        c, side, _ = PixelSpace().config.latent_shape
    else:
        ae = json.loads((ASSETS / "checkpoints" / card["autoencoder"]["file"]).with_suffix(".json").read_text())
        assert card["autoencoder"]["sha256"] == ae["sha256"]  # trained on the shipped autoencoder's latents
        c, side, _ = AutoencoderKL.from_pretrained(ASSETS / "checkpoints" / card["autoencoder"]["file"]).config.latent_shape
    x = torch.randn(2, c, side, side)
    assert model(x, torch.tensor([10, 900])).shape == x.shape
