"""Shared by the unit tests (tests/ is on sys.path when pytest runs them: `from helpers import randomize`)."""

import torch

from minisd.nn import UNetConfig
from minisd.nn.vae import AutoencoderConfig


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.2, norms_near_one: bool = False) -> torch.nn.Module:
    """Fill every parameter with seeded N(0, scale²) values: default inits leave biases and norms trivial,
    which would hide a swapped bias or a missing norm from a parity test. ``norms_near_one`` centres the
    norm layers' weights on 1 so that deep stacks (CLIP) keep a sensible scale. Returns the module, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            shift = 1.0 if norms_near_one and "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * scale + shift)
    return module.eval()


# a tiny text-to-image pipeline's parts (tests of the pipeline's plumbing, not of a trained model)
TINY_UNET = UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                  attention=(True, True), num_attention_heads=2, attention_head_dim=None, norm_num_groups=8,
                  cross_attention_dim=12)
TINY_VAE = AutoencoderConfig(block_out_channels=(16, 16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
                        scaling_factor=0.7)


class HashEncoder:
    """A stand-in text encoder: fixed random states per prompt, (B, 5, 12)."""

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([torch.randn(5, 12, generator=torch.Generator().manual_seed(sum(map(ord, p)) + 1))
                            for p in prompts])


def assert_right_answer_passes_and_stub_falls_back(check, answer, capsys) -> None:
    """An exercise check returns a right answer unchanged; for a stub it says "not written yet" and hands back a
    reference that itself passes the check."""
    def stub(*args, **kwargs):
        raise NotImplementedError

    assert check(answer) is answer
    reference = check(stub)
    assert reference is not stub and check(reference) is reference
    out = capsys.readouterr().out
    assert "not written yet" in out and out.count("✅") == 2
