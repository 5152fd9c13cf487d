"""Run-time settings shared by every lesson: which device, fast or full mode, and seeding.

Two environment variables steer the whole course:

* ``MINISD_DEVICE``: ``cpu``, ``cuda`` or ``mps``. Unset, the best available device is used.
* ``MINISD_FAST``: ``1`` shrinks every training loop and sample count so that a notebook runs in
  seconds yet still executes every code path (the test suite sets it). Unset or ``0``: full mode.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

DEVICES = ("cpu", "cuda", "mps")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")

T = TypeVar("T")

_INSTALLED_ASSETS = Path(__file__).resolve().parent / "assets"  # a wheel installs assets/ as minisd/assets
_CHECKOUT_ASSETS = Path(__file__).resolve().parents[1] / "assets"  # a clone: assets/ beside minisd/
# shipped checkpoints, figures, sample images: wherever this copy of minisd was installed from
ASSETS = _INSTALLED_ASSETS if _INSTALLED_ASSETS.is_dir() else _CHECKOUT_ASSETS


def get_device() -> torch.device:
    """The device to run on: ``MINISD_DEVICE`` if set, else CUDA, then Apple's MPS, then CPU."""
    name = os.environ.get("MINISD_DEVICE", "").strip().lower()
    if name:
        if name not in DEVICES:
            raise ValueError(f"MINISD_DEVICE={name!r} is not a device; use one of {DEVICES}.")
        if name == "cuda" and not torch.cuda.is_available():
            raise ValueError("MINISD_DEVICE='cuda' but torch sees no CUDA GPU; unset it or use 'cpu'.")
        if name == "mps" and not torch.backends.mps.is_available():
            raise ValueError("MINISD_DEVICE='mps' but this machine has no MPS; unset it or use 'cpu'.")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def is_fast() -> bool:
    """True when ``MINISD_FAST`` asks for fast mode (tests), False for the real thing."""
    value = os.environ.get("MINISD_FAST", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"MINISD_FAST={value!r} is not understood; use one of {_TRUE + _FALSE[1:]}.")


def fast_or_full(fast: T, full: T) -> T:
    """Pick a setting by mode, e.g. ``num_steps = fast_or_full(20, 2000)``."""
    return fast if is_fast() else full


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices) and return a CPU ``torch.Generator`` with that seed.

    Pass the returned generator to the sampling functions (``generator=``) so that a cell gives the
    same picture however many cells ran before it.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def describe() -> str:
    """One line saying what this run uses: device (with the GPU's name), mode, torch version."""
    device = get_device()
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    mode = "fast" if is_fast() else "full"
    return f"device: {where} | mode: {mode} | torch {torch.__version__} | CPU threads: {torch.get_num_threads()}"


def asset_path(*parts: str) -> Path:
    """Path of a file shipped in ``assets/``, e.g. ``asset_path("checkpoints", "ddpm_glyphs.safetensors")``."""
    path = ASSETS.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is not in assets/; this course ships: {sorted(p.name for p in ASSETS.rglob('*') if p.is_file())}.")
    return path
