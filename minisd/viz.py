"""Pictures for the lessons: image grids, noising strips, schedule plots and a timestep slider.

Images follow the course convention: tensors in [-1, 1], (C, H, W) or a batch (B, C, H, W).
The ``show_*`` functions draw with matplotlib and return nothing, so a notebook cell shows one
figure, once.

Image grids are heavy: a grid of noisy images stored as PNG takes 0.5 MB of a notebook. In a
notebook, ``show_images`` therefore stores its figure at most ``MAX_WIDTH_PX`` pixels wide (a
notebook column is about that wide, so a wider figure was only ever shown scaled down), as a JPEG
or a PNG, whichever is smaller: JPEG wins on noise and photos, PNG on flat glyphs.
"""

from __future__ import annotations

import io
import math
import textwrap
from typing import Callable, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from .schedules import NoiseSchedule

MAX_WIDTH_PX = 1000  # about the width of a JupyterLab notebook column
DEFAULT_DPI = 100  # matplotlib's default figure.dpi
JPEG_QUALITY = 80  # Pillow's scale 1-95; noise and photos show no visible artefacts at 80


def to_image(x: torch.Tensor) -> np.ndarray:
    """One image (C, H, W) in [-1, 1] as a NumPy array for ``imshow``: (H, W, 3) or (H, W) in [0, 1]."""
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected one image of shape (C, H, W) with C = 1 or 3, got shape {tuple(x.shape)}.")
    array = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def show_images(
    images: torch.Tensor | Sequence[torch.Tensor],
    captions: Sequence[str] | None = None,
    ncols: int = 8,
    title: str | None = None,
    size: float = 1.6,
    wrap: int = 22,
    row_labels: Sequence[str] | None = None,
) -> None:
    """Draw images in a grid, each with an optional caption underneath.

    Args:
        images: (B, C, H, W) in [-1, 1], or a list of (C, H, W) images (sizes may differ).
        captions: one string per image, wrapped at ``wrap`` characters.
        ncols: images per row.
        row_labels: one string per row, written to the left of it (e.g. "original", "f = 4").
    """
    images = list(images)
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"captions must have one entry per image ({len(images)}), got {len(captions)}.")
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"row_labels must have one entry per row: {len(images)} images in rows of {ncols} "
                         f"make {nrows} rows, got {len(row_labels)} labels.")
    lines = max((len(textwrap.wrap(c, wrap)) for c in captions), default=0) if captions else 0
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, (size + 0.17 * lines) * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(to_image(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if captions is not None:
            ax.set_title("\n".join(textwrap.wrap(captions[i], wrap)), fontsize=8)
    for row, label in enumerate(row_labels or []):
        axes[row, 0].text(-0.06, 0.5, label, transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    show_figure(fig, image_format="smaller")


IMAGE_FORMATS = ("png", "jpeg", "smaller")  # "smaller": encode both, keep the smaller


def show_figure(fig: plt.Figure, image_format: str = "png") -> None:
    """Show ``fig``: in a notebook as an image of ``image_format`` (one of ``IMAGE_FORMATS``), at
    most ``MAX_WIDTH_PX`` wide; elsewhere with ``plt.show()``."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}.")
    if "inline" not in matplotlib.get_backend():  # a script or an interactive window
        plt.show()
        return
    from IPython.display import Image, display

    formats = ("png", "jpeg") if image_format == "smaller" else (image_format,)
    data, chosen = min(((figure_bytes(fig, f), f) for f in formats), key=lambda encoded: len(encoded[0]))
    display(Image(data=data, format=chosen))
    plt.close(fig)  # or the inline backend would show it a second time, as a PNG


def figure_bytes(fig: plt.Figure, image_format: str = "jpeg") -> bytes:
    """The figure encoded as ``image_format``, at most ``MAX_WIDTH_PX`` pixels wide."""
    dpi = min(DEFAULT_DPI, MAX_WIDTH_PX / fig.get_figwidth())
    options = {"pil_kwargs": {"quality": JPEG_QUALITY}} if image_format == "jpeg" else {}
    buffer = io.BytesIO()
    fig.savefig(buffer, format=image_format, dpi=dpi, bbox_inches="tight", facecolor="white", **options)
    return buffer.getvalue()


def plot_schedules(named: dict[str, NoiseSchedule], steps: Sequence[int] | None = None) -> None:
    """β_t, ᾱ_t and SNR(t) in dB for several schedules side by side; ``steps`` marks timesteps with dots."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for name, schedule in named.items():
        t = torch.arange(schedule.num_train_timesteps)
        snr_db = 10 * torch.log10(schedule.snr)
        for ax, values in zip(axes, (schedule.betas, schedule.alphas_cumprod, snr_db)):
            (line,) = ax.plot(t, values, label=name)
            if steps is not None:
                ax.plot(list(steps), values[list(steps)], "o", ms=3, color=line.get_color())
    axes[0].set_yscale("log")  # cosine's β spans 4e-5 … 0.999
    for ax, label in zip(axes, (r"$\beta_t$ (log scale)", r"$\bar\alpha_t$", r"SNR$(t)$ in dB")):
        ax.set_xlabel("timestep t")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    plt.show()


def timestep_slider(
    draw: Callable[[int], None], num_train_timesteps: int = 1000, value: int = 0, step: int = 1
):
    """An ipywidgets slider over t in [0, T-1] that calls ``draw(t)`` whenever it moves.

    Display it by making it the last line of a cell. ``draw`` should make one figure.
    """
    import ipywidgets

    slider = ipywidgets.IntSlider(value=value, min=0, max=num_train_timesteps - 1, step=step, description="t",
                                  continuous_update=False, layout=ipywidgets.Layout(width="60%"))
    return ipywidgets.interactive(draw, t=slider)
