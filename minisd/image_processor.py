"""Images in and out of a pipeline: PIL / NumPy / tensors ↔ the model's (B, 3, H, W) in [-1, 1].

The same conventions as diffusers' ``VaeImageProcessor``: a pipeline takes RGB images in [0, 1]
(floats) or [0, 255] (uint8, PIL) and masks in [0, 1] where 1 (white) means "repaint" and 0 (black)
"keep"; inside, images live in [-1, 1] and masks are binarised at 0.5.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

OUTPUT_TYPES = ("pil", "pt", "np", "latent")
MASK_THRESHOLD = 0.5  # diffusers binarises masks here: ≥ 0.5 repaints, < 0.5 keeps


def _as_float_tensor(arg: str, value, channels: tuple[int, ...]) -> torch.Tensor:
    """PIL / ndarray / tensor → float tensor (B, C, H, W) in [0, 1], with a clear error for anything else."""
    if isinstance(value, Image.Image):
        expected = "RGB" if channels == (3,) else "L"
        if value.mode != expected:
            raise ValueError(f"{arg} is a PIL image in mode {value.mode!r}; convert it first with "
                             f"{arg}.convert({expected!r}).")
        value = np.array(value)  # a writable copy: torch.from_numpy warns on PIL's read-only buffer
    if isinstance(value, np.ndarray):
        is_uint8 = value.dtype == np.uint8
        x = torch.from_numpy(np.ascontiguousarray(value)).float()
        if x.ndim == 2:
            x = x[None]  # (1, H, W): a grey mask
        elif x.ndim == 3 and x.shape[-1] in (1, 3):
            x = x.permute(2, 0, 1)  # HWC → CHW
        if is_uint8:
            x = x / 255.0
    elif isinstance(value, torch.Tensor):
        if value.dtype == torch.uint8:
            x = value.float() / 255.0
        elif value.is_floating_point():
            x = value.float()
        else:
            raise ValueError(f"{arg} must hold floats in [0, 1] or uint8 in [0, 255], got dtype {value.dtype}.")
    else:
        raise TypeError(f"{arg} must be a PIL image, a NumPy array or a torch tensor, got {type(value).__name__}.")
    if x.ndim == 3:
        x = x[None]  # (1, C, H, W)
    if x.ndim != 4 or x.shape[1] not in channels:
        raise ValueError(f"{arg} must have {' or '.join(map(str, channels))} channel(s), (C, H, W) or (B, C, H, W) "
                         f"(or H, W, C for arrays); got shape {tuple(value.shape) if hasattr(value, 'shape') else x.shape}.")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"{arg} values must lie in [0, 1] (floats) or [0, 255] (uint8); got "
                         f"[{x.min().item():.3g}, {x.max().item():.3g}]. Images in [-1, 1]: pass (x + 1) / 2.")
    return x


def preprocess_image(image) -> torch.Tensor:
    """An RGB image (PIL, (H, W, 3) array, or (3, H, W) / (B, 3, H, W) tensor in [0, 1]) → (B, 3, H, W) in [-1, 1]."""
    return _as_float_tensor("image", image, (3,)) * 2.0 - 1.0


def preprocess_mask(mask_image) -> torch.Tensor:
    """A mask (PIL "L", (H, W) array, or (1, H, W) / (B, 1, H, W) tensor in [0, 1]) → (B, 1, H, W) of 0 and 1."""
    mask = _as_float_tensor("mask_image", mask_image, (1,))
    return (mask >= MASK_THRESHOLD).float()


def postprocess(images: torch.Tensor, output_type: str):
    """Decoded images (B, 3, H, W) in [-1, 1] → ``output_type``: "pt" (B, 3, H, W) in [0, 1], "np"
    (B, H, W, 3) float in [0, 1], or "pil" (a list of RGB images)."""
    x = ((images.float() + 1) / 2).clamp(0, 1).cpu()
    if output_type == "pt":
        return x
    array = x.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
