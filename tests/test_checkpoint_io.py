"""minisd.checkpoints: one way to save and load every model, with plain-word errors for bad files."""

import json
import pickle

import pytest
import torch

from minisd import checkpoints
from minisd.metrics import GlyphClassifier, GlyphClassifierConfig
from minisd.nn import UNet, UNetConfig
from minisd.nn.vae import AutoencoderConfig, AutoencoderKL
from minisd.nn.vq import VQModel

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_UNET = UNetConfig(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, attention=(False, True),
                       attention_head_dim=8, norm_num_groups=4)
TINY_AE = AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, sample_size=16, num_vq_embeddings=8)
TINY_CLASSIFIER = GlyphClassifierConfig(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4, feature_dim=8)


def seeded(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


@pytest.mark.parametrize("cls, config", [(UNet, TINY_UNET), (AutoencoderKL, TINY_AE), (VQModel, TINY_AE),
                                         (GlyphClassifier, TINY_CLASSIFIER)], ids=lambda x: getattr(x, "__name__", ""))
def test_every_model_round_trips_with_its_class_and_config(tmp_path, cls, config):
    model = seeded(cls(config))
    path = tmp_path / "m.safetensors"
    checkpoints.save_model(model, path, {"note": "hi"})
    meta = checkpoints.read_metadata(path)
    assert meta["model_class"] == cls.__name__ and meta["note"] == "hi"
    loaded = checkpoints.load_model(cls, path)
    assert loaded.config == config and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_loading_the_wrong_class_says_which_class_the_file_holds(tmp_path):
    path = tmp_path / "vae.safetensors"
    checkpoints.save_model(AutoencoderKL(TINY_AE), path)
    with pytest.raises(ValueError, match=r"holds a AutoencoderKL, not a UNet; load it with AutoencoderKL\.from_pretrained"):
        UNet.from_pretrained(path)
    with pytest.raises(ValueError, match="holds a AutoencoderKL, not a UNet"):
        checkpoints.load_weights(UNet(TINY_UNET), path)


def test_a_card_whose_sha256_disagrees_is_refused_and_a_matching_one_accepted(tmp_path):
    path = tmp_path / "unet.safetensors"
    checkpoints.save_model(seeded(UNet(TINY_UNET)), path)
    card = checkpoints.write_card(path, {"command": "python scripts/x.py", "seed": 0})
    assert card["sha256"] == checkpoints.sha256(path) and card["size_bytes"] == path.stat().st_size
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == card["sha256"]
    UNet.from_pretrained(path)  # matches its card
    checkpoints.save_model(UNet(TINY_UNET), path)  # other (random) weights, same card
    with pytest.raises(ValueError, match="does not match its card"):
        UNet.from_pretrained(path)


def test_a_truncated_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "unet.safetensors"
    checkpoints.save_model(UNet(TINY_UNET), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        UNet.from_pretrained(path)


def test_a_pickle_is_never_unpickled_and_gets_a_clear_error(tmp_path):
    path = tmp_path / "model.ckpt"

    class Boom:
        def __reduce__(self):
            return (print, ("this would run on load",))

    path.write_bytes(pickle.dumps({"state_dict": Boom()}))
    with pytest.raises(ValueError, match="not a readable safetensors file.*never unpickles"):
        checkpoints.read_metadata(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoints.read_metadata(tmp_path / "absent.safetensors")


def test_float16_files_load_back_into_float32_models(tmp_path):
    model = seeded(UNet(TINY_UNET))
    path = tmp_path / "half.safetensors"
    checkpoints.save_model(model, path, dtype=torch.float16)
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])  # safetensors: u64 length, JSON header
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    loaded = UNet.from_pretrained(path)
    assert next(loaded.parameters()).dtype == torch.float32
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.half().float(), rtol=0, atol=0)
