"""Checks for lesson 09: training text-to-image.

The loss draws its own random numbers, and every correct answer may draw them in another order, so
the check of ``text_to_image_loss`` never compares with the reference's draws. It hands the learner's
function a recording fake U-Net and checks each sub-step on what the U-Net received: the timesteps,
that every draw comes from ``generator``, DDPM eq. 4 (by moving z_0 and watching x_t move), the
caption dropout row by row, and the loss as a mean over all elements. The other checks (learning
rate, gradient accumulation, EMA) compare with ``minisd.train`` and recognise the usual slips.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import text_to_image, train
from ..schedules import NoiseSchedule
from .core import ExerciseError, randn

__all__ = ["check_text_to_image_loss", "check_lr_at", "check_accumulate_gradients", "check_ema_update"]

STUB = "📝 `{}` is not written yet: using minisd's reference so the lesson can go on."
LOSS_BATCH = 512  # rows per check call: enough to test rates and distributions at 5 standard deviations


def _run(name: str, fn: Callable, *args, **kwargs) -> Any:
    """fn(*args, **kwargs); NotImplementedError passes through (the stub), anything else is explained."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except Exception as error:
        raise ExerciseError(f"`{name}` raised {type(error).__name__}: {error}") from error


def _close(a, b, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- the loss


class RecordingUNet(torch.nn.Module):
    """A fake ε_θ: remembers (x_t, t, c) of every call and predicts 0.5 · x_t (so the loss has a gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls: list[tuple] = []

    def forward(self, sample, timestep=None, encoder_hidden_states=None):
        self.calls.append((sample, timestep, encoder_hidden_states))
        return self.scale * sample

    def __repr__(self) -> str:
        return "a recording fake U-Net"


def _loss_inputs(caption_dropout: float, shift: float = 0.0) -> dict:
    B, U = LOSS_BATCH, 9
    caption_index = 1 + torch.arange(B) % (U - 1)  # never 0: a row equal to prompt_embeds[0] was dropped
    return {"batch": {"latents": randn(B, 4, 8, 8, seed=90) + shift, "caption_index": caption_index},
            "prompt_embeds": randn(U, 5, 6, seed=91), "schedule": NoiseSchedule.stable_diffusion(),
            "caption_dropout": caption_dropout}


def _call_loss(fn: Callable, caption_dropout: float, seed: int, shift: float = 0.0) -> tuple:
    """One call on fresh inputs; returns (loss, the U-Net's calls, the inputs)."""
    unet, inputs = RecordingUNet(), _loss_inputs(caption_dropout, shift)
    loss = _run("text_to_image_loss", fn, unet, inputs["batch"], torch.Generator().manual_seed(seed),
                prompt_embeds=inputs["prompt_embeds"], schedule=inputs["schedule"], caption_dropout=caption_dropout)
    return loss, unet.calls, inputs


def _the_call(where: str, calls: list, B: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    if not calls:
        raise ExerciseError(f"{where}: the U-Net was never called; predict ε with model(x_t, t, encoder_hidden_states=states).")
    if len(calls) > 1:
        raise ExerciseError(f"{where}: the U-Net was called {len(calls)} times; call it once, on the whole batch of {B}.")
    sample, t, states = calls[0]
    if not isinstance(sample, torch.Tensor) or sample.shape != (B, 4, 8, 8):
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        raise ExerciseError(f"{where}: the U-Net got x_t of shape {shape}, expected the latents' shape ({B}, 4, 8, 8).")
    return sample.detach(), t, states


def _check_timesteps(where: str, t: Any, B: int, T: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.shape != (B,):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else repr(t)
        raise ExerciseError(f"{where}: step 1, t: the U-Net got t = {shape}; draw one timestep per image, shape ({B},): "
                            f"torch.randint(0, {T}, ({B},), generator=generator).")
    t = t.detach().cpu()
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ExerciseError(f"{where}: step 1, t: got fractional timesteps such as {t[0].item():.3f}; t is an integer in "
                            f"0 … {T - 1}: torch.randint(0, {T}, …).")
    if t.min() < 0 or t.max() > T - 1:
        raise ExerciseError(f"{where}: step 1, t: got timesteps from {int(t.min())} to {int(t.max())}; they must lie in "
                            f"0 … {T - 1} (torch.randint's upper bound is exclusive: torch.randint(0, {T}, …)).")
    spread = 5 * T / math.sqrt(12 * B)  # 5 standard deviations of the mean of B uniform draws
    if abs(t.double().mean() - (T - 1) / 2) > spread or int(t.max()) - int(t.min()) < T // 2:
        raise ExerciseError(f"{where}: step 1, t: {B} timesteps between {int(t.min())} and {int(t.max())}, mean "
                            f"{t.double().mean():.0f}: draw them uniformly from all {T} (mean ≈ {(T - 1) / 2}).")
    return t.long()


def _check_noising(where: str, sample: torch.Tensor, shifted: torch.Tensor, t: torch.Tensor, z0: torch.Tensor,
                   schedule: NoiseSchedule) -> torch.Tensor:
    """DDPM eq. 4 from two calls whose z_0 differ by 1 everywhere; returns the ε the learner drew."""
    sqrt_ab = schedule.sqrt_alphas_cumprod[t]  # (B,)
    coefficient = (shifted - sample).double().mean(dim=(1, 2, 3))  # ∂x_t/∂z_0 per row
    if not torch.allclose(coefficient, sqrt_ab.double(), atol=1e-4):
        guesses = {"ᾱ_t instead of √ᾱ_t": schedule.alphas_cumprod[t], "√(1 − ᾱ_t): the two coefficients are swapped":
                   schedule.sqrt_one_minus_alphas_cumprod[t], "1: z_0 is not scaled": torch.ones_like(sqrt_ab)}
        hint = next((f" It looks like {name}." for name, g in guesses.items() if torch.allclose(coefficient, g.double(), atol=1e-4)), "")
        raise ExerciseError(f"{where}: step 3, noising: moving z_0 by 1 moved x_t by {coefficient[0]:.4f} in row 0 "
                            f"(t = {t[0]}), expected √ᾱ_t = {sqrt_ab[0]:.4f}: x_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε "
                            f"(DDPM eq. 4; schedule.add_noise).{hint}")
    sigma = schedule.sqrt_one_minus_alphas_cumprod[t].double()[:, None, None, None]
    eps = (sample.double() - sqrt_ab.double()[:, None, None, None] * z0.double()) / sigma
    mean, var = eps.mean().item(), eps.var().item()
    if abs(mean) > 0.03 or abs(var - 1) > 0.05:
        ratio = eps.pow(2).mean(dim=(1, 2, 3)).sqrt() * sigma.flatten()  # per row: scale of the noise term
        hint = (" The noise term looks scaled by (1 − ᾱ_t): use its square root."
                if torch.allclose(ratio, 1 - schedule.alphas_cumprod[t].double(), rtol=0.25) else
                " Draw ε ~ N(0, I) with torch.randn(latents.shape, generator=generator).")
        raise ExerciseError(f"{where}: step 3, noising: x_t − √ᾱ_t z_0 should be √(1 − ᾱ_t) ε with ε standard normal, "
                            f"but (x_t − √ᾱ_t z_0) / √(1 − ᾱ_t) has mean {mean:.3f} and variance {var:.3f} "
                            f"(expected 0 and 1).{hint}")
    return eps


def _check_dropout(where: str, states: Any, inputs: dict) -> None:
    embeds, index, p = inputs["prompt_embeds"], inputs["batch"]["caption_index"], inputs["caption_dropout"]
    B, (U, L, D) = len(index), embeds.shape
    if not isinstance(states, torch.Tensor) or states.shape != (B, L, D):
        shape = tuple(states.shape) if isinstance(states, torch.Tensor) else repr(states)
        raise ExerciseError(f"{where}: step 4, text states: the U-Net got encoder_hidden_states = {shape}, expected "
                            f"({B}, {L}, {D}): each image's caption states, prompt_embeds[caption_index].")
    states = states.detach().cpu()
    caption = (states == embeds[index]).flatten(1).all(1)  # (B,) the row is its own caption's states
    empty = (states == embeds[0]).flatten(1).all(1)  # (B,) the row is the empty prompt's states
    stray = (~caption & ~empty).nonzero().flatten()
    if len(stray):
        i = stray[0].item()
        hint = ("zeros: a dropped caption gets the states of the empty prompt \"\", prompt_embeds[0], which are not zero "
                "(the encoder still sees [CLS], [SEP] and padding)" if not states[i].any() else
                "look up each row's caption, prompt_embeds[caption_index], and put prompt_embeds[0] in the dropped rows")
        raise ExerciseError(f"{where}: step 4, caption dropout: row {i} of the text states is neither its caption's states "
                            f"(prompt_embeds[{index[i].item()}]) nor the empty prompt's (prompt_embeds[0]); it holds {hint}.")
    dropped = int(empty.sum())
    low, high = (p * B - 5 * math.sqrt(B * p * (1 - p)), p * B + 5 * math.sqrt(B * p * (1 - p)))
    if not low <= dropped <= high:
        hint = ("keep a caption when its coin is ≥ caption_dropout and drop it when < caption_dropout"
                if abs(dropped - (1 - p) * B) < abs(dropped - p * B) else
                "draw one coin per image, torch.rand(B, generator=generator) < caption_dropout")
        raise ExerciseError(f"{where}: step 4, caption dropout: {dropped} of {B} captions were replaced by the empty "
                            f"prompt at caption_dropout={p}; expected about {p * B:.0f}. Hint: {hint}.")


def _check_mean_loss(where: str, loss: Any, sample: torch.Tensor, eps: torch.Tensor, z0: torch.Tensor) -> None:
    if isinstance(loss, (int, float)):
        raise ExerciseError(f"{where}: step 5, loss: returned a Python number; return the loss tensor, so that "
                            "the Trainer can call .backward() on it (no .item()).")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ExerciseError(f"{where}: step 5, loss: returned {shape}; return one number, the mean over all elements "
                            "(F.mse_loss(eps_pred, noise)).")
    if not loss.requires_grad:
        raise ExerciseError(f"{where}: step 5, loss: the loss has no gradient; compute it from the U-Net's output "
                            "without .detach() or torch.no_grad().")
    pred = 0.5 * sample.double()  # what the fake U-Net predicted
    expected = (pred - eps).pow(2).mean()
    got = loss.detach().double().reshape(())
    if _close(got, expected):
        return
    slips = {"a sum, not a mean: average over all elements": (pred - eps).pow(2).sum(),
             "summed over channels and pixels, then averaged over the batch: average over all elements":
                 (pred - eps).pow(2).sum(dim=(1, 2, 3)).mean(),
             "compared with z_0: the target is the noise ε": (pred - z0.double()).pow(2).mean(),
             "compared with x_t: the target is the noise ε": (pred - sample.double()).pow(2).mean(),
             "the mean absolute error: square the differences": (pred - eps).abs().mean(),
             "the root of the mean squared error: leave out the square root": (pred - eps).pow(2).mean().sqrt()}
    hint = next((f" It looks like {name}." for name, value in slips.items() if _close(got, value)), "")
    raise ExerciseError(f"{where}: step 5, loss: got {got.item():.6f}, expected the mean squared error between the "
                        f"U-Net's prediction and ε, {expected.item():.6f}.{hint}")


def check_text_to_image_loss(fn: Callable) -> Callable:
    """Check ``fn(model, batch, generator, prompt_embeds, schedule, caption_dropout)`` -> scalar loss."""
    reference = text_to_image.text_to_image_loss
    B, T = LOSS_BATCH, 1000
    for p, seed in ((0.1, 0), (0.0, 1), (1.0, 2), (0.5, 3)):
        where = f"`text_to_image_loss` (B = {B}, caption_dropout={p})"
        try:
            loss, calls, inputs = _call_loss(fn, p, seed)
        except NotImplementedError:
            print(STUB.format("text_to_image_loss"))
            return reference
        sample, t, states = _the_call(where, calls, B)
        t = _check_timesteps(where, t, B, T)
        _, again_calls, _ = _call_loss(fn, p, seed)
        again = _the_call(where, again_calls, B)
        same = [torch.equal(t, torch.as_tensor(again[1]).detach().cpu().long()), torch.equal(sample, again[0]),
                isinstance(states, torch.Tensor) and isinstance(again[2], torch.Tensor) and torch.equal(states, again[2])]
        if not all(same):
            what = ["timesteps t", "noise ε (x_t differs)", "captions to drop"][same.index(False)]
            raise ExerciseError(f"{where}: step 2, randomness: two calls with the same generator state did not draw "
                                f"the same {what}. Draw every random number from `generator` (generator=generator in "
                                "torch.randint, torch.randn, torch.rand); torch.randn_like and friends use torch's "
                                "global generator, so a run could not be repeated or resumed.")
        _, shifted_calls, _ = _call_loss(fn, p, seed, shift=1.0)
        eps = _check_noising(where, sample, _the_call(where, shifted_calls, B)[0], t, inputs["batch"]["latents"],
                             inputs["schedule"])
        _check_dropout(where, states, inputs)
        _check_mean_loss(where, loss, sample, eps, inputs["batch"]["latents"])
    print("✅ `text_to_image_loss` draws t, ε and the dropped captions from the generator, noises by DDPM eq. 4, "
          "drops the expected share of captions and returns the mean squared error (4 inputs).")
    return fn


# ----------------------------------------------------------------------------- learning rate


def reference_lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """minisd.train.lr_at with its TrainConfig spelled out as arguments."""
    config = train.TrainConfig(steps=total_steps, lr=lr, warmup_steps=warmup_steps, min_lr=min_lr, lr_schedule="cosine")
    return train.lr_at(step, config)


def check_lr_at(fn: Callable) -> Callable:
    """Check ``fn(step, lr, warmup_steps, total_steps, min_lr)`` -> learning rate, for steps 0 … total_steps − 1."""
    for lr, W, S, low in ((1e-3, 200, 1000, 0.0), (1e-4, 10, 50, 1e-5), (2e-3, 0, 30, 0.0)):
        where = f"`lr_at` (lr={lr}, warmup_steps={W}, total_steps={S}, min_lr={low})"
        for s in range(S):
            expected = reference_lr_at(s, lr, W, S, low)
            try:
                got = _run("lr_at", fn, s, lr, W, S, low)
            except NotImplementedError:
                print(STUB.format("lr_at"))
                return reference_lr_at
            try:
                got = float(got)
            except (TypeError, ValueError) as error:
                raise ExerciseError(f"{where} at step {s} returned {type(got).__name__}, expected a number.") from error
            if math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-12):
                continue
            progress = (s - W) / max(1, S - W)
            slips = {"the warm-up starts at 0 (step / warmup_steps): step 0 should already train, at lr / warmup_steps; "
                     "use (step + 1) / warmup_steps": s < W and math.isclose(got, lr * s / W, abs_tol=1e-12),
                     "the cosine's progress is counted from step 0; count it from the end of the warm-up, "
                     "(step − warmup_steps) / (total_steps − warmup_steps)":
                         s >= W and math.isclose(got, low + (lr - low) * 0.5 * (1 + math.cos(math.pi * s / S)), rel_tol=1e-6),
                     "the cosine ends at 0; it should end at min_lr: min_lr + (lr − min_lr) · ½ (1 + cos(π · progress))":
                         s >= W and math.isclose(got, lr * 0.5 * (1 + math.cos(math.pi * progress)), rel_tol=1e-6),
                     "the rate stays at lr after the warm-up; let it follow the half cosine down to min_lr":
                         s >= W and math.isclose(got, lr, rel_tol=1e-6)}
            hint = next((f" It looks like {name}." for name, hit in slips.items() if hit), "")
            phase = "warm-up" if s < W else "cosine decay"
            raise ExerciseError(f"{where}: at step {s} ({phase}) expected {expected:.6g}, got {got:.6g}.{hint}")
    print("✅ `lr_at` matches minisd.train.lr_at at every step of 3 schedules.")
    return fn


# ----------------------------------------------------------------------------- gradient accumulation


def reference_accumulate_gradients(model: torch.nn.Module, loss_fn: Callable, micro_batches: list) -> torch.Tensor:
    """The heart of ``Trainer.compute_gradients``: zero, then backward each micro-batch's loss / k; the mean loss."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in micro_batches:
        loss = loss_fn(model, batch) / len(micro_batches)
        loss.backward()
        total += loss.detach()
    return total


def _regression(k: int, size: int, seed: int) -> tuple[torch.nn.Module, Callable, list, dict]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    x, y = randn(k * size, 5, seed=seed), randn(k * size, 3, seed=seed + 1)
    micro = [{"x": x[i * size:(i + 1) * size], "y": y[i * size:(i + 1) * size]} for i in range(k)]
    return model, lambda m, b: F.mse_loss(m(b["x"]), b["y"]), micro, {"x": x, "y": y}


def check_accumulate_gradients(fn: Callable) -> Callable:
    """Check ``fn(model, loss_fn, micro_batches)``: .grad = ∇ of the mean loss over all micro-batches; returns it."""
    for k, size, seed in ((4, 8, 92), (1, 16, 93), (3, 5, 94)):
        where = f"`accumulate_gradients` ({k} micro-batches of {size})"
        model, loss_fn, micro, whole = _regression(k, size, seed)
        params = list(model.parameters())
        before = [p.detach().clone() for p in params]
        stale = [torch.full_like(p, 7.0) for p in params]
        for p, g in zip(params, stale):
            p.grad = g.clone()  # left over from an earlier step: must not count
        try:
            got_loss = _run("accumulate_gradients", fn, model, loss_fn, micro)
        except NotImplementedError:
            print(STUB.format("accumulate_gradients"))
            return reference_accumulate_gradients
        got = [p.grad for p in params]
        if any(not torch.equal(p.detach(), b) for p, b in zip(params, before)):
            raise ExerciseError(f"{where}: the weights changed; only fill .grad here, the optimizer steps afterwards.")
        check = copy.deepcopy(model)
        check.zero_grad(set_to_none=True)
        full_loss = loss_fn(check, whole)
        full_loss.backward()
        expected = [p.grad for p in check.parameters()]
        last = copy.deepcopy(check)
        last.zero_grad(set_to_none=True)
        loss_fn(last, micro[-1]).backward()
        if any(g is None for g in got):
            raise ExerciseError(f"{where}: some parameters have no .grad; call .backward() on every micro-batch's loss.")
        slips = [("the gradients from before were not cleared: zero them first (model.zero_grad())",
                  [e + s for e, s in zip(expected, stale)]),
                 (f"the sum over the {k} micro-batches: divide each micro-batch's loss by {k} before .backward()",
                  [k * e for e in expected]),
                 ("only the last micro-batch counts: call .backward() on every micro-batch, without zeroing in between",
                  [p.grad / k for p in last.parameters()])]
        if not all(_close(g, e, atol=1e-6) for g, e in zip(got, expected)):
            hint = next((f" It looks like {name}." for name, wrong in slips
                         if all(w is not None and _close(g, w, atol=1e-6) for g, w in zip(got, wrong))), "")
            raise ExerciseError(f"{where}: .grad differs from the gradient of the mean loss over the whole batch of "
                                f"{k * size}.{hint}")
        if got_loss is None or not _close(torch.as_tensor(got_loss).detach().reshape(()), full_loss.detach()):
            raise ExerciseError(f"{where}: returned loss {got_loss!r}, expected the mean over all micro-batches, "
                                f"{full_loss.item():.6f}.")
    print("✅ `accumulate_gradients` gives the gradient and loss of one batch k times larger (3 inputs).")
    return fn


# ----------------------------------------------------------------------------- EMA


def reference_ema_update(ema_model: torch.nn.Module, model: torch.nn.Module, step: int, decay: float = 0.999) -> None:
    """minisd.train.ema_update at the warmed-up decay of minisd.train.ema_decay_at."""
    train.ema_update(ema_model, model, train.ema_decay_at(step, decay))


def _ema_pair(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.copy_(torch.randn_like(p))
        model[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))  # buffers: copied, not averaged
    return ema, model


def check_ema_update(fn: Callable) -> Callable:
    """Check ``fn(ema_model, model, step, decay)``: θ_ema ← d θ_ema + (1 − d) θ in place, d = min(decay, (1+k)/(10+k))."""
    for step, decay in ((0, 0.999), (8, 0.999), (5000, 0.999), (100, 0.9)):
        where = f"`ema_update` (step={step}, decay={decay})"
        ema, model = _ema_pair(seed=95 + step)
        ema.requires_grad_(False)  # as the Trainer's ema_model
        start = [p.detach().clone() for p in ema.parameters()]
        weights = [p.detach().clone() for p in model.parameters()]
        expected_ema, _ = _ema_pair(seed=95 + step)
        reference_ema_update(expected_ema, model, step, decay)
        try:
            with torch.no_grad():
                returned = _run("ema_update", fn, ema, model, step, decay)
        except NotImplementedError:
            print(STUB.format("ema_update"))
            return reference_ema_update
        if any(not torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights)):
            raise ExerciseError(f"{where}: the model's own weights changed; only ema_model is updated.")
        got = [p.detach() for p in ema.parameters()]
        if all(torch.equal(g, s) for g, s in zip(got, start)):
            hint = (" You returned a new model: update ema_model's parameters in place instead "
                    "(p_ema.mul_(d).add_(p, alpha=1 − d)), since the Trainer keeps using its ema_model."
                    if returned is not None else " Update them in place: p_ema.mul_(d).add_(p, alpha=1 − d).")
            raise ExerciseError(f"{where}: ema_model's parameters did not change.{hint}")
        d = train.ema_decay_at(step, decay)
        average = lambda dd: [dd * s + (1 - dd) * w for s, w in zip(start, weights)]  # noqa: E731
        if not all(_close(g, e, atol=1e-6) for g, e in zip(got, expected_ema.parameters())):
            slips = {f"the fixed decay {decay}: warm it up, d = min(decay, (1 + step) / (10 + step)) = {d:.4g} here":
                         average(decay),
                     "the two weights swapped: d multiplies the EMA, (1 − d) the model's weights":
                         [(1 - d) * s + d * w for s, w in zip(start, weights)],
                     "the warm-up shifted by one step: the first update, step 0, uses (1 + 0) / (10 + 0) = 0.1":
                         average(min(decay, step / (10 + step))) if step else average(0.0)}
            hint = next((f" It looks like {name}." for name, wrong in slips.items()
                         if all(_close(g, w, atol=1e-6) for g, w in zip(got, wrong))), "")
            raise ExerciseError(f"{where}: expected θ_ema = d · θ_ema + (1 − d) · θ with d = {d:.4g}; the parameters "
                                f"differ.{hint}")
        for (name, b), b_ref in zip(ema.named_buffers(), model.buffers()):
            if not torch.equal(b, b_ref):
                raise ExerciseError(f"{where}: the buffer {name} was not copied: buffers (here BatchNorm's running "
                                    "statistics) are not averaged but copied from the model, b_ema.copy_(b).")
    print("✅ `ema_update` matches minisd.train.ema_update with the warmed-up decay (4 inputs).")
    return fn
