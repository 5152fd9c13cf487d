"""Saving and loading models: safetensors files with the model's class and config in the header.

Every model the course ships (U-Nets, autoencoders, the glyph classifier, the text-to-image model)
goes through this one module:

* ``save_model(model, path)`` writes the weights, with ``model_class`` and ``model_config`` (the
  model's frozen config dataclass as JSON) in the header; ``dtype=torch.float16`` halves the file.
* ``load_model(cls, path)`` reads the header, refuses a file that holds another class ("this file
  holds an AutoencoderKL, not a UNet"), checks the sha256 its JSON card records (if it has a card),
  builds ``cls(config)`` and loads the weights, naming any key or shape that does not fit.
* ``write_card(path, card)`` writes the JSON card beside a shipped file, sha256 and size included.

safetensors holds tensors and strings only, so loading a file can never run code (unlike pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

M = TypeVar("M", bound=torch.nn.Module)


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (what every card records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_path(path: str | Path) -> Path:
    """The JSON card beside a weights file: ``x.safetensors`` → ``x.json``."""
    return Path(path).with_suffix(".json")


def _readable(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}.")
    return path


def read_metadata(path: str | Path) -> dict:
    """The JSON metadata in a safetensors file's header, each value decoded.

    A truncated file, a pickle (``.ckpt``/``.pt``) or anything else that is not safetensors raises a
    ValueError that says so, instead of safetensors' low-level message.
    """
    path = _readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated, or another format such as a "
                         f"pickled .ckpt; minisd never unpickles): {error}") from error
    try:
        return {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:  # written by another tool: keep its plain strings
        return dict(raw)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor in a safetensors file, on the CPU; a clear ValueError for a broken file."""
    path = _readable(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or another format): {error}") from error


def verify_card(path: str | Path) -> dict | None:
    """The card beside ``path`` (None if there is none), after checking that its sha256 matches the file."""
    card_file = card_path(path)
    if not card_file.is_file():
        return None
    card = json.loads(card_file.read_text(encoding="utf-8"))
    expected = card.get("sha256")
    if expected and sha256(path) != expected:
        raise ValueError(f"{path} does not match its card {card_file.name}: the card records sha256 {expected[:12]}…, "
                         f"the file hashes to {sha256(path)[:12]}…. The file was changed or damaged; restore it "
                         "(e.g. `git checkout assets/`) or retrain it with the command its card records.")
    return card


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """ValueError naming missing, unexpected and wrongly shaped keys when ``state`` does not fit ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    shapes = [f"{k}: model {expected[k]} vs file {got[k]}" for k in sorted(expected.keys() & got.keys()) if expected[k] != got[k]]
    if missing or unexpected or shapes:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f", … ({len(items)} in all)" if len(items) > 5 else "")

        problems = [f"{name}: {head(items)}" for name, items in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
        raise ValueError(f"{source} does not fit this {type(model).__name__} (was it built with another config?). "
                         + "; ".join(problems))


def model_config(model: torch.nn.Module) -> dict | None:
    """The model's config dataclass as a dict (what the header stores), or None if it has none."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "__dataclass_fields__"):
        return None
    return config.to_dict() if hasattr(config, "to_dict") else asdict(config)  # to_dict may leave out unused fields


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict) -> None:
    """save_file to a temporary name, then rename: a crash mid-write never leaves half a checkpoint.

    ``metadata`` values are stored as JSON strings (safetensors' header holds strings only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
    os.replace(tmp, path)


def save_model(model: torch.nn.Module, path: str | Path, metadata: dict | None = None,
               dtype: torch.dtype | None = None) -> None:
    """Weights only (e.g. EMA weights to ship), with the model's class and config in the header.

    ``dtype=torch.float16`` halves the file; ``load_model`` casts back to the model's dtype.
    """
    state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    header = {"model_class": type(model).__name__, "model_config": model_config(model)}
    save_tensors(state, path, header | (metadata or {}))


def load_weights(model: M, path: str | Path) -> M:
    """Load a ``save_model`` file into an existing ``model`` (same class, same config)."""
    meta = read_metadata(path)
    _check_class(meta, type(model), path)
    verify_card(path)
    state = read_tensors(path)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state)
    return model


def _check_class(meta: dict, cls: type, path: str | Path) -> None:
    held = meta.get("model_class")
    if held is not None and held != cls.__name__:
        raise ValueError(f"{path} holds a {held}, not a {cls.__name__}; load it with {held}.from_pretrained.")


def load_model(cls: type[M], path: str | Path, device: torch.device | str | None = None) -> M:
    """Build ``cls`` from a ``save_model`` file: class check, card check, config from the header, weights.

    ``cls.config_class`` names the model's config dataclass (with ``from_dict``); every minisd model
    sets it. Returns the model in eval mode on ``device`` (default: CPU).
    """
    meta = read_metadata(path)
    _check_class(meta, cls, path)
    if not meta.get("model_config"):
        raise ValueError(f"{path} has no model_config in its header; write it with minisd.checkpoints.save_model.")
    known = set(cls.config_class.__dataclass_fields__)
    unknown = sorted(set(meta["model_config"]) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config fields {unknown} for {cls.config_class.__name__}; allowed: {sorted(known)}.")
    config = cls.config_class.from_dict(meta["model_config"])
    model = load_weights(cls(config), path)
    return model.to(device or "cpu").eval()


def write_card(path: str | Path, card: dict) -> dict:
    """Write the JSON card for the weights file ``path``, adding its file name, size and sha256; returns it.

    A card says how to reproduce the file: the exact ``command``(s), ``seed``, ``steps``, the data, the
    device and time it took, and the ``metrics`` it reached (measured, never copied by hand).
    """
    path = Path(path)
    card = dict(card) | {"file": path.name, "size_bytes": path.stat().st_size, "sha256": sha256(path)}
    card_path(path).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return card
