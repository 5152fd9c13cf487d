"""What the network predicts: the noise ε, the clean sample x_0, or the velocity v.

Every training pair is x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε (DDPM eq. 4). A network may be trained to output
any one of three things, and given x_t the other two follow from it:

* ``"epsilon"``: ε (Ho et al. 2020; SD v1.x, SD 2.x base at 512 px);
* ``"sample"``: x_0 itself (DDPM's "predict x_0" ablation; DALL·E 2's decoder prior);
* ``"v_prediction"``: v = √ᾱ_t ε - √(1 - ᾱ_t) x_0 (Salimans & Ho 2022, "Progressive distillation", §4 and
  Appendix D; SD 2.x 768-v). Writing √ᾱ = cos φ, √(1 - ᾱ) = sin φ, (x_t, v) is (x_0, ε) rotated by φ, so

      x_0 = √ᾱ x_t - √(1 - ᾱ) v,   ε = √(1 - ᾱ) x_t + √ᾱ v                                   (App. D)

  v stays well scaled at both ends, where ε (at ᾱ → 0) or x_0 (at ᾱ → 1) is nearly impossible to recover.

The names are diffusers' (``prediction_type`` of its schedulers). The samplers in ``minisd.samplers`` are
written for ε; ``to_epsilon`` (inside ``samplers.sample(…, prediction_type=…)``) or ``wrap_model`` convert.
Notation: ᾱ is ``alpha_bar`` (DDPM's ᾱ_t, DDIM's α_t); σ-space's σ gives ᾱ = 1 / (σ² + 1).
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # diffusers' names

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, …), t (B,) long) -> prediction (B, …)


def check_prediction_type(prediction_type: str) -> str:
    """``prediction_type`` itself, or a ValueError naming the accepted values."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is unknown; use one of {PREDICTION_TYPES} "
                         "(ε, x_0, or v = √ᾱ ε - √(1 - ᾱ) x_0; SD v1 uses 'epsilon', SD 2.x 768-v 'v_prediction').")
    return prediction_type


def _sqrt_alpha_bars(alpha_bar: float | torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(√ᾱ, √(1 - ᾱ)) on ``like``'s device and dtype; a ValueError for ᾱ outside [0, 1].

    Both are computed in float32 or better (a Python float: float64; float64 ``like``: float64) and only then cast:
    in bfloat16, ᾱ_0 = 0.99915 would round to 1 and √(1 - ᾱ) to 0."""
    if not isinstance(alpha_bar, torch.Tensor):
        alpha_bar = torch.tensor(alpha_bar, dtype=torch.float64)
    # computed where ᾱ lives (a float64 ᾱ is made on the CPU: MPS has no float64), then moved
    alpha_bar = alpha_bar.to(torch.promote_types(alpha_bar.dtype, torch.promote_types(like.dtype, torch.float32)))
    if alpha_bar.numel() and (alpha_bar.min() < 0 or alpha_bar.max() > 1):
        raise ValueError(f"alpha_bar (ᾱ) must lie in [0, 1], got values from {alpha_bar.min().item():.4g} "
                         f"to {alpha_bar.max().item():.4g}.")
    return tuple(c.to(device=like.device, dtype=like.dtype) for c in (alpha_bar.sqrt(), (1 - alpha_bar).sqrt()))


def to_epsilon(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar: float | torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """ε̂ from what the model predicted:

        "epsilon":       ε̂ = model_output
        "sample":        ε̂ = (x_t - √ᾱ x0_pred) / √(1 - ᾱ)        (DDPM eq. 4 solved for ε)
        "v_prediction":  ε̂ = √(1 - ᾱ) x_t + √ᾱ v̂                   (Salimans & Ho, App. D)

    Args:
        model_output: the model's prediction of type ``prediction_type``, (B, C, H, W).
        x_t: the model's input, on the DDPM scale, (B, C, H, W).
        alpha_bar: ᾱ_t of x_t, a float or a tensor broadcastable to x_t (e.g. (B, 1, 1, 1)), in [0, 1];
            ``"sample"`` needs ᾱ < 1 (at ᾱ = 1, x_t carries no noise to recover).
        prediction_type: one of ``PREDICTION_TYPES``.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model_output
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar = _sqrt_alpha_bars(alpha_bar, x_t)
    if prediction_type == "sample":
        return (x_t - sqrt_alpha_bar * model_output) / sqrt_one_minus_alpha_bar
    return sqrt_one_minus_alpha_bar * x_t + sqrt_alpha_bar * model_output


def to_x0(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar: float | torch.Tensor,
          prediction_type: str) -> torch.Tensor:
    """x0_pred from what the model predicted (arguments as ``to_epsilon``):

        "epsilon":       x0_pred = (x_t - √(1 - ᾱ) ε̂) / √ᾱ        (DDPM eq. 15; needs ᾱ > 0)
        "sample":        x0_pred = model_output
        "v_prediction":  x0_pred = √ᾱ x_t - √(1 - ᾱ) v̂            (Salimans & Ho, App. D)
    """
    check_prediction_type(prediction_type)
    if prediction_type == "sample":
        return model_output
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar = _sqrt_alpha_bars(alpha_bar, x_t)
    if prediction_type == "epsilon":
        return (x_t - sqrt_one_minus_alpha_bar * model_output) / sqrt_alpha_bar
    return sqrt_alpha_bar * x_t - sqrt_one_minus_alpha_bar * model_output


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """The velocity v = √ᾱ ε - √(1 - ᾱ) x_0 (Salimans & Ho 2022, §4), what a v-model learns to output
    (diffusers' ``DDPMScheduler.get_velocity``). x0, noise: x_0 and ε, (B, C, H, W); alpha_bar as ``to_epsilon``."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}.")
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar = _sqrt_alpha_bars(alpha_bar, x0)
    return sqrt_alpha_bar * noise - sqrt_one_minus_alpha_bar * x0


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float | torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """What the model is regressed onto in the simple loss ‖target - model(x_t, t)‖² (DDPM eq. 14 for ε):
    ε (``"epsilon"``), x_0 (``"sample"``) or v (``"v_prediction"``). Arguments as ``v_target``."""
    check_prediction_type(prediction_type)
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}.")
    if prediction_type == "epsilon":
        return noise
    return x0 if prediction_type == "sample" else v_target(x0, noise, alpha_bar)


def wrap_model(model: Model, schedule: NoiseSchedule, prediction_type: str) -> Model:
    """An ε-model from a model that predicts ``prediction_type``: (x_t, t) -> to_epsilon(model(x_t, t), x_t, ᾱ_t, …).

    ᾱ_t is ``schedule.alphas_cumprod[t]``, one per batch item (t: (B,) long, as every sampler passes it).
    For ``"epsilon"`` the model comes back unchanged. ``samplers.sample(…, prediction_type=…)`` converts
    inside the loop instead, with the ᾱ of the step's own noise level: the same up to float rounding on the
    training timesteps, and exact on Karras σ's, whose timesteps are only rounded labels.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model

    def eps_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        per_item = x_t.new_empty(x_t.shape[0], *[1] * (x_t.ndim - 1), dtype=torch.float32)  # keep ᾱ in float32
        alpha_bar = schedule.gather(schedule.alphas_cumprod, t, per_item)  # (B, 1, 1, 1)
        return to_epsilon(model(x_t, t), x_t, alpha_bar, prediction_type)

    return eps_model
