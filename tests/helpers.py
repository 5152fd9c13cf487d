"""Shared by the unit tests (tests/ is on sys.path when pytest runs them: `from helpers import randomize`)."""

import torch


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
