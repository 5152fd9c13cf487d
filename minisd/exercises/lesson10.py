"""Checks for lesson 10: text-to-image and classifier-free guidance.

A guided model is right only if every sub-step is: one U-Net call on [uncond, cond], the timesteps and
text states stacked in the same order as the latents, the output split and combined as
ε̃ = ε_u + w (ε_c − ε_u). The checks hand the learner's code instrumented stand-ins (a fake U-Net that
records each call's batch, a fake text encoder that records each prompt) and name the FIRST sub-step
that differs from the reference, ``minisd.pipeline``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import torch

from .. import pipeline
from .core import Case, ExerciseError, compare, not_written, randn

__all__ = ["check_classifier_free_guidance", "check_encode_prompt", "check_mean_pairwise_distance",
           "mean_pairwise_distance", "RecordingUNet", "RecordingTextEncoder"]


# ----------------------------------------------------------------------------- classifier-free guidance


class RecordingUNet:
    """A fake ε_θ(x_t, t, c) that remembers the batch of every call.

    ε for row r = 0.3 · x_r + cos(t_r / 150) + (the mean over tokens of c_r, first C features, per channel):
    it depends on all three inputs, so a row whose latents, timestep and text states do not belong
    together gives a different ε. Malformed calls are recorded and answered with zeros of x's shape, so
    the check can name the slip instead of a shape error further down.
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | int | None = None,
                 encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append({"sample": sample, "timestep": timestep, "states": encoder_hidden_states})
        if not self.well_formed(sample, timestep, encoder_hidden_states):
            return torch.zeros_like(sample) if isinstance(sample, torch.Tensor) else sample
        return self.eps(sample, timestep, encoder_hidden_states)

    @staticmethod
    def well_formed(sample, timestep, states) -> bool:
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4:
            return False
        B, C = sample.shape[:2]
        return (isinstance(timestep, torch.Tensor) and timestep.shape == (B,) and isinstance(states, torch.Tensor)
                and states.ndim == 3 and states.shape[0] == B and states.shape[2] >= C)

    @staticmethod
    def eps(sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        C = sample.shape[1]
        text = states.mean(dim=1)[:, :C, None, None]  # (B, C, 1, 1)
        return 0.3 * sample + torch.cos(timestep.float() / 150)[:, None, None, None] + text

    def __repr__(self) -> str:
        return "a recording fake U-Net"


def _row_owner(row: torch.Tensor, candidates: torch.Tensor) -> int | None:
    """Index i with candidates[i] == row exactly, else None."""
    for i, candidate in enumerate(candidates):
        if candidate.shape == row.shape and torch.equal(candidate, row):
            return i
    return None


def _diagnose_call(where: str, call: dict, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                   uncond: torch.Tensor) -> None:
    """The batch of the single U-Net call of a guided step, checked sub-step by sub-step."""
    B, C = x.shape[:2]
    sample, timestep, states = call["sample"], call["timestep"], call["states"]
    if not isinstance(sample, torch.Tensor) or sample.ndim != 4:
        raise ExerciseError(f"{where}: the U-Net got latents of type {type(sample).__name__}, expected a (2B, C, h, w) tensor.")
    if sample.shape[1] != C:
        raise ExerciseError(f"{where}: the U-Net got latents of shape {tuple(sample.shape)}: {sample.shape[1]} channels "
                            f"instead of {C}. Concatenate along the batch axis: torch.cat([x_t, x_t], dim=0).")
    if sample.shape[0] != 2 * B:
        hint = ("the latents were not doubled: torch.cat([x_t, x_t])" if sample.shape[0] == B
                else "the batch should hold each latent twice, once per half")
        raise ExerciseError(f"{where}: the U-Net got {sample.shape[0]} latents for B = {B} images; expected 2B = {2 * B}: {hint}.")
    if states is None:
        raise ExerciseError(f"{where}: the U-Net got no text states: pass encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]).")
    if not isinstance(states, torch.Tensor) or states.ndim != 3 or states.shape[0] != 2 * B:
        shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
        hint = ("only one half's states: concatenate both, torch.cat([negative_prompt_embeds, prompt_embeds])"
                if isinstance(states, torch.Tensor) and states.shape[0] == B
                else "concatenate the two (B, L, D) tensors along the batch axis (dim=0)")
        raise ExerciseError(f"{where}: encoder_hidden_states has shape {shape}, expected ({2 * B}, L, D): {hint}.")
    if not isinstance(timestep, torch.Tensor) or timestep.shape != (2 * B,):
        shape = tuple(timestep.shape) if isinstance(timestep, torch.Tensor) else repr(timestep)
        raise ExerciseError(f"{where}: the timesteps were not doubled: the U-Net got t of shape {shape} for a batch of "
                            f"{2 * B} latents; give one timestep per row, torch.cat([t, t]).")
    halves = []
    for r in range(2 * B):
        i, j = _row_owner(sample[r], x), _row_owner(timestep[r], t)
        k_cond, k_uncond = _row_owner(states[r], cond), _row_owner(states[r], uncond)
        if i is None:
            raise ExerciseError(f"{where}: row {r} of the U-Net's latents is none of the B latents x_t; pass x_t unchanged, twice.")
        if j != i:
            raise ExerciseError(f"{where}: row {r} holds the latents of image {i} but the timestep of "
                                f"{'no image' if j is None else f'image {j}'}; concatenate t in the same order as the latents.")
        k = k_uncond if k_uncond is not None else k_cond
        if k is None:
            raise ExerciseError(f"{where}: row {r}'s text states are neither a prompt's nor a negative prompt's; pass the "
                                "(B, L, D) states unchanged, concatenated along dim 0.")
        if k != i:
            raise ExerciseError(f"{where}: text states not in the same order as the latents: row {r} holds the latents of "
                                f"image {i} but the {'negative ' if k_uncond is not None else ''}prompt states of image {k}. "
                                "Stack both with torch.cat([...], dim=0) so that row r of each belongs to the same image.")
        halves.append("uncond" if k_uncond is not None else "cond")
    for image in range(B):  # each image once with each half's states
        kinds = sorted(h for h, row in zip(halves, sample) if torch.equal(row, x[image]))
        if kinds != ["cond", "uncond"]:
            raise ExerciseError(f"{where}: image {image} should appear once with its negative prompt's states and once "
                                f"with its prompt's; the rows hold {halves}.")


def _diagnose_combination(where: str, got: Any, eps_u: torch.Tensor, eps_c: torch.Tensor, w: float, case: Case,
                          cond_first: bool) -> None:
    expected = eps_u + w * (eps_c - eps_u)
    swapped = ("your batch is [prompt_embeds, negative_prompt_embeds], so the first half of the output is ε_c, but "
               "it was used as ε_u. Order the batch [negative_prompt_embeds, prompt_embeds] as diffusers does" if cond_first
               else "the first half of the output belongs to the first half of the batch: with "
                    "[negative_prompt_embeds, prompt_embeds] that is ε_u")
    if isinstance(got, torch.Tensor) and got.shape[0] == 2 * eps_u.shape[0] and got.shape[1:] == eps_u.shape[1:]:
        raise ExerciseError(f"{where} returned {got.shape[0]} rows, the whole U-Net output: split it into its halves, "
                            "eps_uncond, eps_cond = eps.chunk(2), and combine them.")
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and not torch.allclose(got, expected, atol=1e-5):
        slips = [(eps_c + w * (eps_u - eps_c), f"the halves are the wrong way round: {swapped}"),
                 (eps_u + w * eps_c, "w was applied to ε_c instead of the difference: ε̃ = ε_u + w (ε_c − ε_u)"),
                 (w * eps_c, "w·ε_c alone: add ε_u and scale the difference, ε̃ = ε_u + w (ε_c − ε_u)"),
                 (eps_c + w * (eps_c - eps_u), "the formula starts from ε_c: it starts from ε_u, ε̃ = ε_u + w (ε_c − ε_u)"),
                 (eps_u - w * (eps_c - eps_u), "the difference has the wrong sign: ε̃ = ε_u + w (ε_c − ε_u)")]
        for wrong, hint in slips:
            if torch.allclose(got, wrong, atol=1e-5) and not torch.allclose(wrong, expected, atol=1e-5):
                raise ExerciseError(f"{where}: wrong combination: {hint}.")
    compare("classifier_free_guidance", case, expected, got, atol=1e-5, rtol=1e-5)


def _cfg_cases() -> list[tuple[int, float, str]]:
    return [(2, 7.5, "B = 2 images, w = 7.5"), (1, 3.0, "B = 1, w = 3"), (3, 0.0, "B = 3, w = 0 (unconditional)"),
            (2, 1.0, "B = 2, w = 1 (no guidance)")]


def check_classifier_free_guidance(fn: Callable) -> Callable:
    """Check ``fn(unet, prompt_embeds, negative_prompt_embeds, guidance_scale)`` → ``model(x_t, t)`` = ε̃.

    Each case builds the guided model with a ``RecordingUNet`` and calls it once; x_t, t (one distinct
    timestep per image) and the states of every image differ, so a row that mixes images shows. At
    w = 1 both answers are right: one call on the prompt's states alone, or the batched call
    (ε_u + 1·(ε_c − ε_u) = ε_c).
    """
    notes = set()
    for n, (B, w, label) in enumerate(_cfg_cases()):
        x, t = randn(B, 4, 4, 4, seed=100 + n), torch.tensor([981, 741, 501][:B])
        cond, uncond = randn(B, 3, 6, seed=110 + n), randn(B, 3, 6, seed=120 + n)
        case = Case({"unet": "RecordingUNet()", "prompt_embeds": cond, "negative_prompt_embeds": uncond,
                     "guidance_scale": w}, label)
        where = f"`classifier_free_guidance` ({label}), model(x_t {tuple(x.shape)}, t {t.tolist()})"
        unet, failure = RecordingUNet(), None
        try:
            got = fn(unet, cond, uncond, w)(x.clone(), t.clone())
        except NotImplementedError:
            return not_written("classifier_free_guidance", pipeline.classifier_free_guidance)
        except Exception as error:  # noqa: BLE001 - the calls it made may say why; else report the error
            failure = error
        notes |= _diagnose_calls(where, unet, x, t, cond, uncond, w)
        if failure is not None:
            raise ExerciseError(f"{where} raised {type(failure).__name__}: {failure}") from failure
        if got is None:
            raise ExerciseError(f"{where} returned None: did you forget a `return` (in the inner function, or the "
                                "function itself)?")
        eps_u, eps_c = RecordingUNet.eps(x, t, uncond), RecordingUNet.eps(x, t, cond)
        states = unet.calls[0]["states"]
        cond_first = states.shape[0] == 2 * B and _row_owner(states[0], cond) is not None
        _diagnose_combination(where, got, eps_u, eps_c, w, case, cond_first)
    print(f"✅ `classifier_free_guidance` matches the reference on {len(_cfg_cases())} inputs.")
    for note in sorted(notes):
        print(f"   note: {note}.")
    return fn


def _diagnose_calls(where: str, unet: RecordingUNet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    uncond: torch.Tensor, w: float) -> set[str]:
    """How many U-Net calls, then the one call's batch; returns notes on right answers that differ from diffusers'."""
    B = x.shape[0]
    if not unet.calls:
        raise ExerciseError(f"{where}: the U-Net was never called; the guided model must call unet(...) once per step.")
    if len(unet.calls) > 1:
        sizes = [getattr(c["sample"], "shape", ("?",))[0] for c in unet.calls]
        raise ExerciseError(f"{where}: {len(unet.calls)} U-Net calls (batches of {sizes}) instead of one: concatenate "
                            "the unconditional and conditional halves and make ONE call on 2B rows.")
    call = unet.calls[0]
    sample, states = call["sample"], call["states"]
    if w in (0, 1) and isinstance(sample, torch.Tensor) and sample.ndim == 4 and sample.shape[0] == B:
        half, name, symbol = (cond, "prompt_embeds", "ε_c") if w == 1 else (uncond, "negative_prompt_embeds", "ε_u")
        if not (isinstance(states, torch.Tensor) and states.shape == half.shape and torch.equal(states, half)):
            raise ExerciseError(f"{where}: at w = {w:g} the guided ε is {symbol}, so a single call on B rows must use "
                                f"{name}.")
        return {f"w = {w:g} takes one half alone, one call on B rows"
                + (", as diffusers does" if w == 1 else " (diffusers still makes the batched call)")}
    _diagnose_call(where, call, x, t, cond, uncond)
    notes = set()
    if w == 1:
        notes.add("w = 1 runs the batched call too: right (ε_u + 1·(ε_c − ε_u) = ε_c), at twice the cost")
    if _row_owner(states[0], cond) is not None:
        notes.add("your batch is [cond, uncond]: right, as you split it the same way; diffusers orders it "
                  "[uncond, cond], so that the first half is the negative prompt's")
    return notes


# ----------------------------------------------------------------------------- the two halves' text states


class RecordingTextEncoder:
    """A fake text encoder: fixed states (L, D) = (3, 6) per distinct prompt string; remembers every prompt."""

    def __init__(self) -> None:
        self.prompts: list[Any] = []

    def states_of(self, prompt: str) -> torch.Tensor:
        seed = sum((i + 1) * ord(ch) for i, ch in enumerate(prompt)) % 100_003
        return torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))

    def encode(self, prompts) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.prompts += prompts
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            hint = " A missing negative prompt is the empty prompt \"\"." if None in bad else ""
            raise TypeError(f"text_encoder.encode got {bad[0]!r}: prompts must be strings.{hint}")
        return torch.stack([self.states_of(p) for p in prompts])  # (B, 3, 6)

    def __repr__(self) -> str:
        return "a recording fake text encoder"


def _reference_encode_prompt(text_encoder, prompt, negative_prompt=None, num_images_per_prompt: int = 1):
    """The pipeline's own ``encode_prompt``, run on just a text encoder."""
    parts = SimpleNamespace(text_encoder=text_encoder, device=torch.device("cpu"), dtype=torch.float32)
    return pipeline.StableDiffusionPipeline.encode_prompt(parts, prompt, num_images_per_prompt, negative_prompt, True)


def _diagnose_halves(where: str, got: Any, case: Case, encoder: RecordingTextEncoder) -> None:
    k = case.kwargs
    prompts = [k["prompt"]] if isinstance(k["prompt"], str) else list(k["prompt"])
    negative, n = k["negative_prompt"], k["num_images_per_prompt"]
    negatives = [""] * len(prompts) if negative is None else ([negative] * len(prompts) if isinstance(negative, str) else list(negative))
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise ExerciseError(f"{where} should return a pair (prompt_embeds, negative_prompt_embeds), got {type(got).__name__}.")
    for name, value, asked in (("prompt_embeds", got[0], prompts), ("negative_prompt_embeds", got[1], negatives)):
        if not isinstance(value, torch.Tensor):
            raise ExerciseError(f"{where}: {name} is a {type(value).__name__}, expected a tensor.")
        expected_rows = [p for p in asked for _ in range(n)]
        if value.shape != (len(expected_rows), 3, 6):
            hint = ""
            if value.ndim == 3 and value.shape[0] == len(asked) and n > 1:
                hint = f" Repeat each prompt's states num_images_per_prompt = {n} times."
            elif name == "negative_prompt_embeds" and value.ndim == 3 and value.shape[0] == n and len(prompts) > 1:
                hint = " A single negative prompt (or \"\") applies to every prompt: one per prompt, then repeat."
            raise ExerciseError(f"{where}: {name} has shape {tuple(value.shape)}, expected ({len(expected_rows)}, L, D) = "
                                f"(len(prompts) · num_images_per_prompt, L, D).{hint}")
        table = {p: encoder.states_of(p) for p in set(prompts + negatives)}
        rows = [next((p for p, s in table.items() if torch.allclose(r, s)), None) for r in value]
        if rows == expected_rows:
            continue
        tiled = [p for _ in range(n) for p in asked]
        if rows == tiled and tiled != expected_rows:
            raise ExerciseError(f"{where}: {name} holds the prompts in the order {rows}: the images of one prompt must sit "
                                "next to each other, as diffusers lays them out: repeat_interleave(n, dim=0), not repeat.")
        r = next(i for i, (a, b) in enumerate(zip(rows, expected_rows)) if a != b)
        said = "states of no prompt" if rows[r] is None else f"the states of {rows[r]!r}"
        hint = (" With no negative prompt the unconditional half is the empty prompt \"\"." if negative is None else
                " A single negative prompt applies to every prompt." if isinstance(negative, str) and len(prompts) > 1 else "")
        raise ExerciseError(f"{where}: {name}[{r}] should be the states of {expected_rows[r]!r}, got {said}.{hint}")


def check_encode_prompt(fn: Callable) -> Callable:
    """Check ``fn(text_encoder, prompt, negative_prompt, num_images_per_prompt)`` → (cond, uncond), each (B·n, L, D)."""
    cases = [Case({"prompt": ["a red letter K on a blue background", "a green digit 7 on a white background"],
                   "negative_prompt": None, "num_images_per_prompt": 3}, "two prompts, no negative prompt, 3 images each"),
             Case({"prompt": "a letter K", "negative_prompt": "red", "num_images_per_prompt": 2}, "one prompt, negative \"red\""),
             Case({"prompt": ["a letter K", "a digit 7", "a letter Q"], "negative_prompt": "blue", "num_images_per_prompt": 1},
                  "three prompts, one negative for all"),
             Case({"prompt": ["a letter K", "a digit 7"], "negative_prompt": ["red", "green"], "num_images_per_prompt": 2},
                  "one negative per prompt")]
    for case in cases:
        encoder = RecordingTextEncoder()
        where = f"`encode_prompt` on {case.label} ({', '.join(f'{k}={v!r}' for k, v in case.kwargs.items())})"
        try:
            got = fn(encoder, **case.kwargs)
        except NotImplementedError:
            return not_written("encode_prompt", _reference_encode_prompt)
        except Exception as error:
            raise ExerciseError(f"{where} raised {type(error).__name__}: {error}") from error
        if got is None:
            raise ExerciseError(f"{where} returned None: did you forget the `return`?")
        _diagnose_halves(where, got, case, encoder)
    print(f"✅ `encode_prompt` matches the reference on {len(cases)} inputs.")
    return fn


# ----------------------------------------------------------------------------- a diversity measure


def mean_pairwise_distance(images: torch.Tensor) -> torch.Tensor:
    """Diversity of N images of one prompt: the mean over pairs i < j of the RMS pixel distance,

        d(x_i, x_j) = √( mean over channels and pixels of (x_i − x_j)² ).

    images: (N, C, H, W), N ≥ 2, in [-1, 1] (d in the same units: 0 = identical, 2 = opposite). Returns a 0-d tensor.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"images must be (N, C, H, W) with N ≥ 2, got {getattr(images, 'shape', type(images).__name__)}.")
    x = images.flatten(1).double()  # (N, P)
    distances = torch.cdist(x, x) / x.shape[1] ** 0.5  # (N, N), RMS distance
    i, j = torch.triu_indices(len(x), len(x), offset=1)  # the N (N − 1) / 2 pairs i < j
    return distances[i, j].mean()


def _diagnose_distance(where: str, got: Any, images: torch.Tensor, case: Case) -> None:
    try:
        got = torch.as_tensor(got, dtype=torch.float64)
    except Exception as error:  # noqa: BLE001 - any non-number answer gets the same message
        raise ExerciseError(f"{where} returned a {type(got).__name__}, expected a number.") from error
    N = images.shape[0]
    if got.numel() != 1:
        raise ExerciseError(f"{where} returned shape {tuple(got.shape)}, expected one number: average the distances "
                            "over the pairs i < j.")
    x = images.flatten(1).double()
    d2 = torch.cdist(x, x).pow(2) / x.shape[1]  # (N, N) mean squared distance
    i, j = torch.triu_indices(N, N, offset=1)
    expected = d2[i, j].sqrt().mean()
    slips = [(d2.sqrt().mean(), "the diagonal (each image against itself, distance 0) is in the mean: average over the "
              "pairs i < j only"),
             (d2[i, j].mean(), "the mean squared distance: take the square root of each pair's mean square (RMS) first"),
             (d2[i, j].mean().sqrt(), "the root of the mean over all pairs: take the root per pair, then average"),
             ((d2[i, j] * x.shape[1]).sqrt().mean(), "the Euclidean distance over all pixels: divide the squared "
              "differences by the number of values (mean, not sum) before the root")]
    for wrong, hint in slips:
        if torch.allclose(got.reshape(()), wrong, rtol=1e-4) and not torch.allclose(wrong, expected, rtol=1e-4):
            raise ExerciseError(f"{where} looks like {hint}.")
    compare("mean_pairwise_distance", case, expected, got.reshape(()), atol=1e-5, rtol=1e-4)


def check_mean_pairwise_distance(fn: Callable) -> Callable:
    """Check ``fn(images)``: mean RMS distance over the pairs i < j of (N, C, H, W) images."""
    cases = [Case({"images": randn(5, 3, 8, 8, seed=130).clamp(-1, 1)}, "5 random images"),
             Case({"images": torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 0.0, 1.0)])}, "3 flat images"),
             Case({"images": randn(2, 1, 6, 6, seed=131)}, "one pair")]
    for case in cases:
        where = f"`mean_pairwise_distance` on {case.label} {tuple(case.kwargs['images'].shape)}"
        try:
            got = fn(case.kwargs["images"].clone())
        except NotImplementedError:
            return not_written("mean_pairwise_distance", mean_pairwise_distance)
        except Exception as error:
            raise ExerciseError(f"{where} raised {type(error).__name__}: {error}") from error
        if got is None:
            raise ExerciseError(f"{where} returned None: did you forget the `return`?")
        _diagnose_distance(where, got, case.kwargs["images"], case)
    print(f"✅ `mean_pairwise_distance` matches the reference on {len(cases)} inputs.")
    return fn
