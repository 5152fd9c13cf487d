"""Self-checks for the lessons' exercises.

Each ``check_<name>(fn)`` calls the learner's ``fn`` on a few fixed inputs and compares the result
with minisd's reference implementation:

* correct  -> prints a short confirmation and returns ``fn`` (the lesson goes on with your code);
* a stub   -> (``fn`` raises ``NotImplementedError``) says so and returns the reference, so the
  rest of the lesson still runs;
* wrong    -> raises ``ExerciseError`` saying on which input, what was expected and what came back.

Use it as ``add_noise = check_add_noise(add_noise)`` in the cell after the exercise.

This module holds the machinery (``check``, ``Case``, ``ExerciseError``); the checks of lesson NN
live in ``lessonNN.py`` and are all re-exported by the package, so ``exercises.check_add_noise``
works from any notebook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..schedules import NoiseSchedule


class ExerciseError(AssertionError):
    """Raised when an exercise's answer disagrees with the reference."""


@dataclass
class Case:
    """One input to try: keyword arguments and how to describe them to a learner."""

    kwargs: dict[str, Any]
    label: str


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.numel() <= 8:
            return f"tensor({value.tolist()})"
        return f"tensor of shape {tuple(value.shape)}"
    if isinstance(value, NoiseSchedule):
        return repr(value)
    return repr(value)


def describe_inputs(case: Case) -> str:
    """How a case's inputs read in a message: 'label: (x=tensor of shape (2, 3), t=5)'."""
    args = ", ".join(f"{k}={_describe(v)}" for k, v in case.kwargs.items())
    return f"{case.label}: ({args})"


def compare(name: str, case: Case, expected: torch.Tensor, got: Any, atol: float, rtol: float) -> None:
    """ExerciseError, saying where and by how much, unless ``got`` matches ``expected`` (shape, then values)."""
    where = f"`{name}` on input {describe_inputs(case)}"
    if got is None:
        raise ExerciseError(f"{where} returned None: did you forget the `return`?")
    try:
        got = torch.as_tensor(got)
    except Exception as error:  # noqa: BLE001 - any non-tensor answer gets the same message
        raise ExerciseError(f"{where} returned a {type(got).__name__}, expected a tensor.") from error
    if got.shape != expected.shape:
        raise ExerciseError(
            f"{where} returned shape {tuple(got.shape)}, expected {tuple(expected.shape)}.\n"
            "Hint: check broadcasting: a per-item value needs shape (B, 1, 1, 1) to multiply images (B, C, H, W)."
        )
    got_f, expected_f = got.detach().cpu().double(), expected.detach().cpu().double()
    if torch.allclose(got_f, expected_f, atol=atol, rtol=rtol):
        return
    error = (got_f - expected_f).abs()
    worst = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
    raise ExerciseError(
        f"{where} gives the wrong values.\n"
        f"  largest difference {error.max().item():.3g} at index {worst}: "
        f"expected {expected_f[worst].item():.6g}, got {got_f[worst].item():.6g}\n"
        f"  expected (first values): {expected_f.flatten()[:5].tolist()}\n"
        f"  got      (first values): {got_f.flatten()[:5].tolist()}"
    )


def _fresh(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The same inputs with every torch.Generator restarted, so each call draws the same numbers."""
    fresh = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Generator):
            value = torch.Generator(value.device).set_state(value.get_state())
        fresh[key] = value
    return fresh


def check(
    name: str,
    fn: Callable,
    reference: Callable,
    cases: list[Case],
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Callable:
    """Compare ``fn`` with ``reference`` on every case; see the module docstring for the outcomes."""
    for case in cases:
        expected = reference(**_fresh(case.kwargs))
        try:
            got = fn(**_fresh(case.kwargs))
        except NotImplementedError:
            print(f"📝 `{name}` is not written yet: using minisd's reference so the lesson can go on.")
            return reference
        except Exception as error:
            raise ExerciseError(
                f"`{name}` raised {type(error).__name__}: {error}\n  on input {describe_inputs(case)}"
            ) from error
        compare(name, case, expected, got, atol, rtol)
    print(f"✅ `{name}` matches the reference on {len(cases)} inputs.")
    return fn


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


_compare, _inputs = compare, describe_inputs  # the names lesson03 still uses
