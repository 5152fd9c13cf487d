"""Stable Diffusion v1.5 at full size, with seeded random weights (no machine here can download the real
ones): minisd's U-Net and VAE decoder give diffusers' output on SD's own shapes, (1, 4, 64, 64) latents
and (1, 77, 768) text states. One copy of the weights is shared by both models (load_state_dict(assign=True)),
so the test needs ~3.5 GB for the U-Net rather than 7.

Tolerance: the same float32 maths in another order: measured max |Δ| ≈ 1e-5 on outputs of std ≈ 1
(see the closing note); we allow 1e-3 absolute."""

import time

import pytest
import torch

from minisd.convert import diffusers_unet_config, diffusers_vae_config
from minisd.nn import UNet, UNetConfig
from minisd.nn.vae import AutoencoderConfig, AutoencoderKL

SD_UNET_PARAMETERS, SD_VAE_PARAMETERS = 859_520_964, 83_653_863  # published sizes (model cards, diffusers)


def shared_copy(ours_cls, config, theirs: torch.nn.Module) -> torch.nn.Module:
    with torch.device("meta"):
        ours = ours_cls(config)
    ours.load_state_dict(theirs.state_dict(), assign=True)  # strict; the same tensors, not copies
    return ours.eval()


@torch.no_grad()
def test_sd_v15_unet_at_full_size_equals_diffusers():
    diffusers = pytest.importorskip("diffusers")
    config = UNetConfig.stable_diffusion_v1()
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**diffusers_unet_config(config)).eval()
    ours = shared_copy(UNet, config, theirs)
    assert sum(p.numel() for p in ours.parameters()) == SD_UNET_PARAMETERS
    g = torch.Generator().manual_seed(1)
    latents, states = torch.randn(1, 4, 64, 64, generator=g), torch.randn(1, 77, 768, generator=g)
    start = time.perf_counter()
    expected = theirs(latents, 500, encoder_hidden_states=states).sample
    middle = time.perf_counter()
    got = ours(latents, 500, encoder_hidden_states=states)
    end = time.perf_counter()
    print(f"SD v1.5 U-Net forward, 64×64 latents, CPU: diffusers {middle - start:.1f} s, minisd {end - middle:.1f} s; "
          f"max |Δ| = {(got - expected).abs().max().item():.2e}, output std {expected.std().item():.3f}")
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)


@torch.no_grad()
def test_sd_v1_vae_decoder_at_full_size_equals_diffusers():
    diffusers = pytest.importorskip("diffusers")
    config = AutoencoderConfig.stable_diffusion_v1()
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(**diffusers_vae_config(config)).eval()
    ours = shared_copy(AutoencoderKL, config, theirs)
    assert sum(p.numel() for p in ours.parameters()) == SD_VAE_PARAMETERS
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    expected = theirs.decode(latents).sample
    middle = time.perf_counter()
    got = ours.decode(latents)
    print(f"SD VAE decode to 512×512, CPU: diffusers {middle - start:.1f} s, minisd {time.perf_counter() - middle:.1f} s; "
          f"max |Δ| = {(got - expected).abs().max().item():.2e}")
    assert got.shape == (1, 3, 512, 512)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
