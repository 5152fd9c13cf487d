"""Checks for lesson 03: pixel-space DDPM. Besides formulas (timestep embedding, loss, one step), two mechanisms:

* ``check_resnet_block``: ``ResnetBlock2D``'s forward written with its sub-modules (as in lesson 08): hooks record
  what each sub-module read, so a wrong answer is named at the first step that diverges; answers that bypass the
  sub-modules are localised by probes (the block with its time projection zeroed, another time embedding).
* ``check_ddpm_sample``: the sampling loop (DDPM Algorithm 2), run on a toy ε_θ that records every (x_t, t), then
  replayed step by step; draws in another order pass when each step's implied noise is a fresh N(0, I) draw.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch.nn import functional as F

from .. import diffusion, samplers
from ..config import get_device
from ..nn import embeddings
from ..nn.resnet import ResnetBlock2D
from ..schedules import NoiseSchedule
from .core import (RNG_SEED, Case, ExerciseError, _fresh, call_learner, check, check_module, close, compare,
                   describe_inputs, first_slip, module_case, not_written, randn, run_seeded, slips_that_run)

__all__ = ["check_timestep_embedding", "check_resnet_block", "check_ddpm_loss", "check_ddpm_step", "check_ddpm_sample",
           "reference_resnet_block", "reference_ddpm_sample"]


def check_timestep_embedding(fn: Callable) -> Callable:
    """Check ``fn(timesteps, dim)``: SD's sinusoidal embedding, cosines first (flip_sin_to_cos)."""
    cases = [Case({"timesteps": torch.tensor([0, 1, 10, 500, 999]), "dim": 32}, "five timesteps"),
             Case({"timesteps": torch.tensor([3, 700]), "dim": 8}, "narrow")]
    # sin/cos of angles up to 999 rad: float32 rounding of the angle alone is ~1e-4
    return check("timestep_embedding", fn, embeddings.timestep_embedding, cases, atol=2e-4, rtol=0)


# ----------------------------------------------------------------------------- the ResNet block

NORM_FIRST = "norm before the activation: GroupNorm, then SiLU, then the conv"
TIME_PATH = ("add time_emb_proj(SiLU(temb)), shape (B, C_out), to conv1's output as one shift per channel: "
             "[:, :, None, None] makes it (B, C_out, 1, 1), which broadcasts over H×W")


def reference_resnet_block(block: ResnetBlock2D, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """minisd's ``ResnetBlock2D`` forward (the class's, also when the instance's is replaced): x (B, C_in, H, W),
    temb (B, temb_channels) -> (B, C_out, H, W)."""
    return ResnetBlock2D.forward(block, x, temb)


def _resnet_steps(block: ResnetBlock2D, x: torch.Tensor, temb: torch.Tensor) -> dict:
    """What each sub-module should read, with the slips that give something else there; the output's slips
    are the same slips carried through the rest of the block (for answers that bypass the sub-modules)."""
    def drop(h: torch.Tensor, always: bool = False) -> torch.Tensor:  # the mask the learner's dropout draws
        torch.manual_seed(RNG_SEED)
        return F.dropout(h, block.dropout.p, training=True) if always else block.dropout(h)

    def tail(h_: torch.Tensor) -> torch.Tensor:  # norm2 → SiLU → dropout → conv2, plus the skip
        return skip + block.conv2(drop(act(block.norm2(h_))))

    act, skip = F.silu, x if block.conv_shortcut is None else block.conv_shortcut(x)
    n1 = block.norm1(x)
    c1 = block.conv1(act(n1))  # (B, C_out, H, W)
    proj = block.time_emb_proj(act(temb))  # (B, C_out)
    h = c1 + proj[:, :, None, None]
    n2, out = block.norm2(h), tail(h)
    torch.manual_seed(RNG_SEED)
    torch.testing.assert_close(out, block(x, temb))
    conv1 = [(n1, "the SiLU between norm1 and conv1 is missing"), (act(x), "norm1 is missing before the SiLU"),
             (x, "norm1 and the SiLU are missing: conv1(SiLU(norm1(x)))"), (block.norm1(act(x)), NORM_FIRST),
             (F.relu(n1), "the activation is SiLU (block.nonlinearity), not ReLU")]
    norm2 = [(act(h), NORM_FIRST), (c1, f"the time embedding is never added to conv1's output: {TIME_PATH}"),
             (c1 + block.time_emb_proj(temb)[:, :, None, None], "the time embedding must go through SiLU and "
              "time_emb_proj first: time_emb_proj(SiLU(temb))"),
             (c1 + act(proj)[:, :, None, None], "the SiLU goes before time_emb_proj, not after: time_emb_proj(SiLU(temb))"),
             (c1 * proj[:, :, None, None], f"the time embedding is added, not multiplied: {TIME_PATH}")]
    norm2 += slips_that_run((lambda: c1 + proj[:, None, None, :], "wrong broadcasting: [:, None, None, :] lays the C_out "
                             f"shifts along the width; {TIME_PATH}"))
    conv2 = [(n2, "the SiLU between norm2 and conv2 is missing"), (act(h), "norm2 is missing before the SiLU"),
             (h, "norm2 and the SiLU are missing: conv2(dropout(SiLU(norm2(h))))"), (drop(block.norm2(act(h))), NORM_FIRST),
             (act(n2), "the dropout is missing: block.dropout(h) right before conv2"),
             (act(drop(n2)), "the dropout goes after the SiLU, right before conv2"),
             (drop(act(n2), always=True), "the dropout is active in eval mode: use block.dropout, which follows "
              "block.train() / block.eval() (or F.dropout(h, p, training=block.training))")]
    conv2 += slips_that_run((lambda: drop(act(block.norm1(h))), "norm1 is used where norm2 belongs: each GroupNorm has "
                             "its own weights, norm2 after conv1"))
    return {"norm1": (x, [(act(x), NORM_FIRST)]), "conv1": (act(n1), conv1),
            "time_emb_proj": (act(temb), [(temb, "the time embedding must go through SiLU before time_emb_proj"),
                                          (F.relu(temb), "the activation is SiLU (block.nonlinearity), not ReLU")]),
            "norm2": (h, norm2), "conv2": (drop(act(n2)), conv2), "out": (out, [
                (out - skip, "the skip connection is missing: return shortcut + h, with shortcut = "
                             "block.conv_shortcut(x) (a 1×1 conv) when the channels change, else x"),
                (tail(c1) + proj[:, :, None, None], f"the time embedding is added at the end; {TIME_PATH}, before norm2")]
                + [(tail(block.conv1(v) + proj[:, :, None, None]), hint) for v, hint in conv1]
                + [(tail(v), hint) for v, hint in norm2] + [(skip + block.conv2(v), hint) for v, hint in conv2])}


def _resnet_calls(where: str, block: ResnetBlock2D, inputs: tuple, rec, error: Exception | None) -> None:
    """When the learner's function raised: the slips that usually cause it, from the recorded calls."""
    if error is None:
        return
    if isinstance(error, TypeError) and "NoneType" in str(error) and block.conv_shortcut is None:
        raise ExerciseError(f"{where}: block.conv_shortcut is None here: the channels do not change, so the skip is x "
                            "itself (use conv_shortcut only when it is not None).")
    if rec.first("time_emb_proj") and rec.first("norm2") is None and "must match the size" in str(error):
        raise ExerciseError(f"{where} while adding the time embedding: {error}\n  Hint: wrong broadcasting shape; {TIME_PATH}.")
    if rec.first("conv2") is not None and block.conv_shortcut is not None and rec.first("conv_shortcut") is None:
        raise ExerciseError(f"{where}: the channels change ({inputs[0].shape[1]} -> {block.conv2.out_channels}): the skip goes "
                            f"through block.conv_shortcut(x), a 1×1 conv, before the addition.\n  ({error})")


def _probe(fn: Callable, block: ResnetBlock2D, *inputs: torch.Tensor) -> tuple | None:
    try:
        return run_seeded(fn, block, *inputs), run_seeded(block, *inputs)
    except Exception:  # noqa: BLE001 - a probe that fails localises nothing
        return None


def _resnet_diagnose(fn: Callable) -> Callable:
    def diagnose(where: str, block: ResnetBlock2D, inputs: tuple, steps: dict, got: Any, rec) -> None:
        if close(got, steps["out"][0]):
            return
        for name in ("norm1", "conv1", "time_emb_proj", "norm2", "conv2"):  # the first sub-module that read wrong
            if rec.first(name) is not None and rec.first(name)[1]:
                first_slip(where, f"the input of {name}", rec.first(name)[1][0], *steps[name])
        for wrong, hint in steps["out"][1]:  # sub-modules bypassed: the same slips, on the output
            if close(got, wrong):
                raise ExerciseError(f"{where}: the output is wrong: {hint}.")
        x, temb = inputs  # probes: the block with its time term set to 0, and another time embedding
        zeroed = copy.deepcopy(block)
        torch.nn.init.zeros_(zeroed.time_emb_proj.weight), torch.nn.init.zeros_(zeroed.time_emb_proj.bias)
        without_time, other_time = _probe(fn, zeroed, x, temb), _probe(fn, block, x, -2 * temb)  # (fn's, the block's)
        if without_time is not None and close(*without_time):
            if other_time is not None and close(other_time[0], got):
                raise ExerciseError(f"{where}: your block gives the same output for two different time embeddings: the "
                                    f"time embedding is never used; {TIME_PATH}.")
            raise ExerciseError(f"{where}: your block is right when its time term is zero (time_emb_proj set to 0) and "
                                f"wrong otherwise: the image path is right, check where you add the time embedding: {TIME_PATH}.")
        first_slip(where + " (even with time_emb_proj set to 0 it differs: check the image path, norm1 → SiLU → conv1, "
                   "norm2 → SiLU → dropout → conv2, and the skip)", "the output", got, steps["out"][0], [])
    return diagnose


def check_resnet_block(fn: Callable) -> Callable:
    """Check ``fn(block, x, temb)`` -> (B, C_out, H, W), the forward of ``ResnetBlock2D`` written with its sub-modules."""
    def case(seed: int, B: int, C_in: int, C_out: int, H: int, W: int, D: int, groups: int, dropout: float = 0.0,
             train: bool = False) -> Callable:
        inputs = randn(B, C_in, H, W, seed=seed), randn(B, D, seed=seed + 1)
        return lambda: module_case(ResnetBlock2D(C_in, C_out, D, groups, dropout=dropout), inputs, _resnet_steps, seed, train)()

    cases = [("3 maps 16×4×16 -> 16 channels (skip = x), temb (3, 20), dropout 0.5 in eval mode", case(31, 3, 16, 16, 4, 16, 20, 4, 0.5)),
             ("2 maps 8×3×5 -> 16 channels (a 1×1 conv_shortcut), temb (2, 12)", case(30, 2, 8, 16, 3, 5, 12, 4)),
             ("2 maps 8×4×6 -> 8 channels, training mode (dropout 0.5 active), temb (2, 12)", case(32, 2, 8, 8, 4, 6, 12, 2, 0.5, True))]
    return check_module("resnet_block", fn, reference_resnet_block, cases, "ResnetBlock2D", _resnet_calls,
                        _resnet_diagnose(fn))


class _ToyModel:
    """A toy ε_θ recording every (x_t, t) it is called with. Any deterministic function of (x_t, t) would do to check
    a loss; this one is exact for data x_0 ~ N(MU, S² I), so that a sampling loop keeps x at O(1) down to t = 0."""

    MU, S = 0.3, 0.5

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule, self.calls = schedule, []

    def eps(self, x_t: torch.Tensor, t: Any) -> torch.Tensor:
        alpha_bar_t = self.schedule.gather(self.schedule.alphas_cumprod, torch.as_tensor(t).to(x_t.device), x_t)
        return (1 - alpha_bar_t).sqrt() * (x_t - alpha_bar_t.sqrt() * self.MU) / (alpha_bar_t * self.S**2 + 1 - alpha_bar_t)

    def __call__(self, x_t: torch.Tensor, t: Any) -> torch.Tensor:
        t = torch.as_tensor(t)  # as given, on its own device: the loss check compares it with x0's
        self.calls.append((x_t.detach().clone(), t.detach()))
        return self.eps(x_t, t)

    def timesteps(self) -> list:
        """Each call's t as an int (as given where it was not one timestep)."""
        return [int(t.flatten()[0]) if t.numel() and (t == t.flatten()[0]).all() else t.tolist() for _, t in self.calls]

    def __repr__(self) -> str:
        return f"a toy ε_θ(x_t, t), exact for data N({self.MU}, {self.S}²)"


def _reference_ddpm_loss(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor,
                         generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                         noise: torch.Tensor | None = None) -> torch.Tensor:
    if t is None and noise is None:
        return diffusion.ddpm_loss(model, schedule, x0, generator)  # t first, then ε, both from generator
    if t is None:
        t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    return torch.nn.functional.mse_loss(model(schedule.add_noise(x0, noise, t), t), noise)


_DRAWS_HINT = ("Hint: draw on the CPU with `generator` (torch.randint(..., generator=generator), "
              "torch.randn(x0.shape, generator=generator)), then move the draws with `.to(x0.device)`.")


def _call(fn: Callable, kwargs: dict, label: str):
    return call_learner("ddpm_loss", fn, kwargs, f"input {label}", lambda error: f"\n  {_DRAWS_HINT}" * (
        "device" in str(error) or "generator" in str(error)))


def _check_own_draws(fn: Callable, schedule: NoiseSchedule, device: torch.device) -> bool:
    """Call fn with a generator only; check that its draws are reproducible, t uniform integers and ε
    standard normal, and that it returns the MSE for its own draws. True if the draws are the reference's."""
    x0 = randn(64, 1, 8, 8, seed=9).clamp(-1, 1).to(device)
    kwargs = {"schedule": schedule, "x0": x0, "generator": torch.Generator().manual_seed(3)}
    label = "own draws: (model, schedule, x0 of shape (64, 1, 8, 8), generator) with t and noise left to None"
    first, second = _ToyModel(schedule), _ToyModel(schedule)
    got = _call(fn, {"model": first, **kwargs}, label)
    again = _call(fn, {"model": second, **kwargs}, label)
    where = f"`ddpm_loss` on input {label}"
    if len(first.calls) != 1:
        raise ExerciseError(f"{where} called the model {len(first.calls)} times; call it once, on x_t and t.")
    if got is None:
        raise ExerciseError(f"{where} returned None: did you forget the `return`?")
    got, again = torch.as_tensor(got).detach(), torch.as_tensor(again).detach()
    if got.numel() != 1:
        raise ExerciseError(f"{where} returned shape {tuple(got.shape)}; return one number, the mean over batch and pixels.")
    if not torch.equal(got, again) or not torch.equal(first.calls[0][1], second.calls[0][1]):
        raise ExerciseError(f"{where} gave different results for two generators in the same state: draw t and ε "
                            f"from `generator`, so that training is reproducible.\n  {_DRAWS_HINT}")
    x_t, t = first.calls[0]
    T = schedule.num_train_timesteps
    if t.shape != (x0.shape[0],) or t.is_floating_point() or t.min() < 0 or t.max() >= T:
        raise ExerciseError(f"{where} gave the model t = {t.flatten()[:8].tolist()}… (shape {tuple(t.shape)}, "
                            f"{t.dtype}); draw one integer timestep per image in [0, {T - 1}] with torch.randint(0, {T}, (B,), …).")
    if t.min() > T // 4 or t.max() < 3 * T // 4:  # 64 uniform draws: both fail with probability < 1e-7
        raise ExerciseError(f"{where} drew 64 timesteps in [{int(t.min())}, {int(t.max())}] only; "
                            f"draw them uniformly from all of [0, {T - 1}].")
    if x_t.device != x0.device or t.device != x0.device:
        raise ExerciseError(f"{where} gave the model x_t on {x_t.device} and t on {t.device}, x0 is on {x0.device}.\n  {_DRAWS_HINT}")
    alpha_bar_t = schedule.gather(schedule.alphas_cumprod, t, x0).double()
    noise = (x_t.double() - alpha_bar_t.sqrt() * x0.double()) / (1 - alpha_bar_t).sqrt()  # the ε your x_t holds
    if noise.mean().abs() > 0.1 or not 0.9 < noise.std() < 1.1:
        raise ExerciseError(f"{where}: the noise in your x_t has mean {noise.mean():.3f} and standard deviation "
                            f"{noise.std():.3f}; ε ~ N(0, I) has 0 and 1 (with torch.randn, and x_t from schedule.add_noise).")
    expected = torch.nn.functional.mse_loss(first.eps(x_t, t).double(), noise)
    if not torch.allclose(got.double().cpu(), expected.cpu(), rtol=1e-4, atol=1e-5):
        raise ExerciseError(f"{where} returned {got.item():.6g}, but the mean squared error between the model's "
                            f"prediction and the noise you added is {expected.item():.6g}.")
    reference = _reference_ddpm_loss(_ToyModel(schedule), **_fresh(kwargs))
    return bool(torch.allclose(got.double().cpu(), reference.detach().double().cpu(), rtol=1e-5, atol=1e-6))


def check_ddpm_loss(fn: Callable) -> Callable:
    """Check ``fn(model, schedule, x0, generator, t=None, noise=None)``: L_simple (DDPM eq. 14).

    First with the draws given (t and noise passed in: any correct formula matches the reference);
    then with a generator only (the learner draws t and ε: any order of the two draws passes, the
    message says when it differs from the reference's). Inputs live on ``config.get_device()``.
    """
    device, schedule = get_device(), NoiseSchedule()
    x0 = randn(8, 1, 8, 8, seed=5).clamp(-1, 1).to(device)
    cases = [
        Case({"model": _ToyModel(schedule), "schedule": schedule, "x0": x0, "generator": None,
              "t": torch.tensor(t, device=device), "noise": randn(8, 1, 8, 8, seed=seed).to(device)},
             f"given draws {i + 1} (t and noise passed in)")
        for i, (t, seed) in enumerate([([0, 1, 10, 250, 500, 750, 998, 999], 6), ([999, 3, 640, 7, 77, 0, 512, 333], 7)])
    ]
    for case in cases:
        recorder = _ToyModel(schedule)
        try:
            got = call_learner("ddpm_loss", fn, {**case.kwargs, "model": recorder}, f"input {describe_inputs(case)}")
        except NotImplementedError:
            return not_written("ddpm_loss", _reference_ddpm_loss)
        try:
            compare("ddpm_loss", case, _reference_ddpm_loss(**case.kwargs), got, atol=1e-5, rtol=1e-5)
        except ExerciseError as error:
            used = recorder.calls[0][1].cpu() if recorder.calls else None
            if used is not None and not torch.equal(used.flatten(), case.kwargs["t"].cpu()):
                raise ExerciseError(f"{error}\n  Hint: the model was called with t = {used.tolist()}: use the `t` and "
                                    "`noise` passed in, and draw your own only when they are None.") from None
            raise
    same_draws = _check_own_draws(fn, schedule, device)
    note = "" if same_draws else (
        "\n   Your draws differ from the reference's (it draws t first, then ε): that is fine, any order is "
        "correct; only your training numbers will differ a little from the stored ones.")
    print(f"✅ `ddpm_loss` matches the reference on {len(cases)} inputs with the draws given, and draws its own "
          f"t and ε correctly.{note}")
    return fn


def _reference_ddpm_step(schedule: NoiseSchedule, eps_pred: torch.Tensor, x_t: torch.Tensor, t: int,
                         noise: torch.Tensor) -> torch.Tensor:
    return samplers.ddpm_step(schedule, eps_pred, x_t, t, t - 1, noise=noise)


def check_ddpm_step(fn: Callable) -> Callable:
    """Check ``fn(schedule, eps_pred, x_t, t, noise)``: one ancestral step t -> t-1 (DDPM eq. 11)."""
    x_t, eps, z = randn(2, 1, 8, 8, seed=6), randn(2, 1, 8, 8, seed=7), randn(2, 1, 8, 8, seed=8)
    cases = [Case({"schedule": NoiseSchedule(), "eps_pred": eps, "x_t": x_t, "t": t, "noise": z}, f"t={t}")
             for t in (999, 500, 1, 0)]
    return check("ddpm_step", fn, _reference_ddpm_step, cases, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- the sampling loop


def reference_ddpm_sample(model: Callable, schedule: NoiseSchedule, shape: tuple, generator: torch.Generator | None,
                          t_start: int | None = None) -> torch.Tensor:
    """DDPM's Algorithm 2: x_T ~ N(0, I), then eq. 11 for t = t_start, …, 0 (t_start None: T - 1), all on the CPU."""
    x = torch.randn(shape, generator=generator)  # x_T
    for t in range(schedule.num_train_timesteps - 1 if t_start is None else t_start, -1, -1):
        x = samplers.ddpm_step(schedule, model(x, t), x, t, t - 1, noise=torch.randn(shape, generator=generator))
    return x


def _timestep_slip(got: list, expected: list, T: int, t_start: int | None) -> str | None:
    """What is wrong with the timesteps the model was called at (None: they are right, or a right beginning)."""
    if got == expected:
        return None
    first = expected[0] if expected else T - 1 if t_start is None else t_start
    if not got:
        return "the model is never called: eps_pred = model(x, t) at every step"
    for wrong, hint in ((expected[::-1], f"t must count down, from {first} to 0: range({first}, -1, -1)"),
                        (expected[:-1], f"the last step, t = 0, is missing: range({first}, -1, -1) stops after 0")):
        if got == wrong:
            return hint
    starts = [(T - 1, f"start at t_start = {t_start} when it is given (None: T - 1)")] * (t_start is not None) + [
        (999, f"loop over this schedule's own T, schedule.num_train_timesteps = {T}, not a fixed 1000")] * (T != 1000)
    for wrong_start, hint in starts + [(first + 1, f"the first step is t = {first}: in code timesteps run 0 … T - 1")]:
        if got[0] == wrong_start:
            return hint
    return f"the model was called at t = {got[:4]}… ({len(got)} calls); one call per step, from t = {first} down to 0"


def _replay(where: str, fn: Callable, rec: _ToyModel, got: torch.Tensor, shape: tuple, seed: int,
            t_start: int | None) -> bool:
    """Raise at the first step whose x is not ddpm_step(x_t, ε_θ(x_t, t), fresh z ~ N(0, I)); True if every z is
    the reference's draw (x_T first, then one z per step), False if the draws come in another (fine) order."""
    schedule, xs, g = rec.schedule, [x for x, _ in rec.calls], torch.Generator().manual_seed(seed)
    x_T = xs[0]
    if x_T.shape != torch.Size(shape) or x_T.mean().abs() > 0.25 or not 0.75 < x_T.std() < 1.25:
        raise ExerciseError(f"{where}: the model's first input x_T has shape {tuple(x_T.shape)}, mean {x_T.mean():.3f} "
                            f"and std {x_T.std():.3f}; x_T ~ N(0, I): torch.randn(shape, generator=generator).")
    if not close(fn(_ToyModel(schedule), schedule, shape, torch.Generator().manual_seed(seed), t_start), got, 0):
        raise ExerciseError(f"{where}: two runs with generators in the same state gave different samples: draw x_T "
                            "and every z with generator=generator.")
    same_order, previous_z = torch.equal(x_T, torch.randn(shape, generator=g)), None
    for k, t in enumerate(rec.timesteps()):
        x_t, x_next = xs[k], xs[k + 1] if k + 1 < len(xs) else got
        step, step_with = f"{where}, at the step t = {t} -> {t - 1}", lambda z: samplers.ddpm_step(
            schedule, rec.eps(x_t, t), x_t, t, t - 1, noise=z)
        slips = [(x_t, "the model sees the same x at every step: update x = ddpm_step(schedule, eps_pred, x, t, noise) "
                       "and call model(x, t) on the current x")] + [
            (step_with(None), "no noise was added: pass a fresh z ~ N(0, I) as noise at every step")] * (t > 0) + [
            (step_with(previous_z), "the same z at every step: draw a fresh z inside the loop")] * (previous_z is not None and t > 0)
        if same_order:
            z = torch.randn(shape, generator=g)
            if close(x_next, step_with(z), 1e-4):
                previous_z = z
                continue
        for wrong, hint in slips:
            if close(x_next, wrong, 1e-4):
                raise ExerciseError(f"{step}: the new x is wrong: {hint}.")
        if t == 0:  # σ_0 = 0: the last step is the posterior mean, whatever the draws
            first_slip(step, "the new x (the last step adds no noise)", x_next, step_with(None), [])
            continue
        z = (x_next - step_with(None)) / samplers.ddpm_step(schedule, torch.zeros(()), torch.zeros(()), t, t - 1,
                                                            noise=torch.ones(()))  # the z it implies: (x - mean) / σ_t
        if z.mean().abs() > 0.25 or not 0.75 < z.std() < 1.25:
            raise ExerciseError(f"{step}: the new x is not ddpm_step(schedule, model(x, t), x, t, z) for any z ~ N(0, I) "
                                f"(the z it implies has mean {z.mean():.3f}, std {z.std():.3f}): pass the model's "
                                "prediction for the current x and t, and a fresh standard normal z.")
        same_order, previous_z = False, z
    return same_order


def check_ddpm_sample(fn: Callable) -> Callable:
    """Check ``fn(model, schedule, shape, generator, t_start=None)`` -> x_0 (DDPM Algorithm 2, eq. 11 at each step)."""
    cases = [("DDPM's schedule (T = 1000), shape (4, 1, 16, 16)", NoiseSchedule(), (4, 1, 16, 16), None, 40),
             ("a 20-step schedule (T = 20, betas 0.001 to 0.2), shape (2, 2, 16, 16)",
              NoiseSchedule(20, beta_start=1e-3, beta_end=0.2), (2, 2, 16, 16), None, 41),
             ("DDPM's schedule with t_start = 49 (50 steps), shape (4, 1, 16, 16)", NoiseSchedule(), (4, 1, 16, 16), 49, 42)]
    own_order = False
    for label, schedule, shape, t_start, seed in cases:
        where, rec, T = f"`ddpm_sample` on input {label}", _ToyModel(schedule), schedule.num_train_timesteps
        expected_ts = list(range(T - 1 if t_start is None else t_start, -1, -1))
        try:
            got = fn(rec, schedule, shape, torch.Generator().manual_seed(seed), t_start)
        except NotImplementedError:
            return not_written("ddpm_sample", reference_ddpm_sample)
        except Exception as error:
            slip = _timestep_slip(rec.timesteps(), expected_ts[:len(rec.calls)], T, t_start)
            raise ExerciseError(f"{where} raised {type(error).__name__}: {error}" + (f"\n  Hint: {slip}." if slip else "")) from error
        if slip := _timestep_slip(rec.timesteps(), expected_ts, T, t_start):
            raise ExerciseError(f"{where}: {slip}.")
        if not isinstance(got, torch.Tensor) or got.shape != torch.Size(shape):
            raise ExerciseError(f"{where} returned {type(got).__name__} {tuple(getattr(got, 'shape', ()))}: return x "
                                f"after the last step, shape {shape}" + (" (did you forget the `return`?)." if got is None else "."))
        expected = reference_ddpm_sample(_ToyModel(schedule), schedule, shape, torch.Generator().manual_seed(seed), t_start)
        if not close(got, expected, 1e-4):  # else step by step, which also passes draws in another order
            own_order |= not _replay(where, fn, rec, got, shape, seed, t_start)
    note = ("\n   Your draws come in another order than the reference's (x_T, then one z per step): that is fine; only "
            "your pictures will differ from the stored ones.") if own_order else ""
    print(f"✅ `ddpm_sample` runs DDPM's Algorithm 2 step by step on {len(cases)} inputs.{note}")
    return fn
