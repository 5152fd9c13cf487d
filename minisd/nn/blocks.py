"""Plumbing shared by the U-Net and the VAE: a resolution level's holder, and counting parameters.

Neither is maths; both live here so that ``unet.py`` and ``vae.py`` import from a neutral module
rather than from each other.
"""

from __future__ import annotations

from torch import nn


class Level(nn.Module):
    """One resolution level: a holder whose attribute names make diffusers' key names.

    ``down_blocks.1.resnets.0.conv1.weight``, ``down_blocks.1.attentions.0…``,
    ``down_blocks.1.downsamplers.0.conv.weight``: the U-Net's and the VAE's loops read these lists.
    """

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] = (), resample_name: str | None = None,
                 resample: list[nn.Module] = ()) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)  # empty at levels without attention: no keys
        if resample_name is not None:  # "downsamplers" or "upsamplers"; empty at the last level
            setattr(self, resample_name, nn.ModuleList(resample))


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters in ``module``."""
    return sum(p.numel() for p in module.parameters())
