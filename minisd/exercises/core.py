"""Self-checks for the lessons' exercises.

Each ``check_<name>(fn)`` calls the learner's ``fn`` on a few fixed inputs and compares the result
with minisd's reference implementation:

* correct  -> prints a short confirmation and returns ``fn`` (the lesson goes on with your code);
* a stub   -> (``fn`` raises ``NotImplementedError``) says so and returns the reference, so the
  rest of the lesson still runs;
* wrong    -> raises ``ExerciseError`` saying on which input, what was expected and what came back.

Use it as ``add_noise = check_add_noise(add_noise)`` in the cell after the exercise.

This module holds the machinery; the checks of lesson NN live in ``lessonNN.py`` and are all
re-exported by the package, so ``exercises.check_add_noise`` works from any notebook:

* ``check`` (one comparison per input) and ``check_parts`` (a ``diagnose`` that names the first part
  of the answer that differs), both on ``Case`` inputs;
* ``check_module`` for answers that are a module's forward pass written out by hand: the learner's
  function gets the module, ``ModuleRecorder`` records what each sub-module received, and
  ``first_slip`` names the first recorded step that matches a known slip;
* ``call_learner`` and ``not_written``: what every check does with the learner's exceptions: a stub's
  NotImplementedError hands back the reference, any other becomes an ExerciseError naming the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

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


def not_written(name: str, reference: Callable) -> Callable:
    """What a check does with a stub: say that ``name`` is not written yet and hand back ``reference``."""
    print(f"📝 `{name}` is not written yet: using minisd's reference so the lesson can go on.")
    return reference


def call_learner(name: str, fn: Callable, kwargs: dict[str, Any], on: str,
                 hint: Callable[[Exception], str] = lambda error: "") -> Any:
    """``fn(**kwargs)`` on fresh generators. NotImplementedError passes through (the caller hands back the
    reference); any other exception becomes an ExerciseError naming the input, ``on``, plus ``hint(error)``."""
    try:
        return fn(**_fresh(kwargs))
    except NotImplementedError:
        raise
    except Exception as error:
        raise ExerciseError(f"`{name}` raised {type(error).__name__}: {error}\n  on {on}{hint(error)}") from error


def check_parts(
    name: str,
    fn: Callable,
    reference: Callable,
    cases: list[Case],
    diagnose: Callable[[str, Case, Any, Any], None],
    describe: Callable[[Case], str] | None = None,
) -> Callable:
    """Call ``fn`` and ``reference`` on every case; ``diagnose(where, case, expected, got)`` raises an
    ExerciseError for a wrong answer. A stub hands back the reference (``not_written``); any other
    exception becomes an ExerciseError naming the input, ``describe(case)`` (default "input <label>: (…)")."""
    describe = describe or (lambda case: f"input {describe_inputs(case)}")
    for case in cases:
        expected = reference(**_fresh(case.kwargs))
        try:
            got = call_learner(name, fn, case.kwargs, describe(case))
        except NotImplementedError:
            return not_written(name, reference)
        where = f"`{name}` on {describe(case)}"
        if got is None:
            raise ExerciseError(f"{where} returned None: did you forget the `return`?")
        diagnose(where, case, expected, got)
    print(f"✅ `{name}` matches the reference on {len(cases)} inputs.")
    return fn


def check(
    name: str,
    fn: Callable,
    reference: Callable,
    cases: list[Case],
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Callable:
    """Compare ``fn`` with ``reference`` on every case; see the module docstring for the outcomes."""
    return check_parts(name, fn, reference, cases,
                       lambda where, case, expected, got: compare(name, case, expected, got, atol, rtol))


# ----------------------------------------------------------------------------- answers that are a module's forward

MODULE_TOL = 1e-5  # float32 answers computed in another order differ by ~1e-7 here
RNG_SEED = 0  # the global RNG seed under which the reference and the learner run (dropout masks match)
Slips = list[tuple[torch.Tensor, str]]  # (what a slip gives, how to fix it)


def close(a: Any, b: torch.Tensor, tol: float = MODULE_TOL) -> bool:
    """``a`` is a tensor of ``b``'s shape with ``b``'s values (to ``tol``)."""
    return (isinstance(a, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a.detach().double(), b.double(), atol=tol, rtol=tol))


class ModuleRecorder:
    """Hooks on every sub-module: ``calls`` = [[name, args, kwargs, output]] in call order.

    Inputs are recorded before the call (a pre-hook), so that a call that fails is still seen.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module, self.calls, self.handles = module, [], []

    def __enter__(self) -> "ModuleRecorder":
        for name, module in self.module.named_modules():
            def before(m, args, kwargs, name=name):
                self.calls.append([name, args, kwargs, None])

            def after(m, args, kwargs, out, name=name):
                next(c for c in reversed(self.calls) if c[0] == name)[3] = out

            self.handles += [module.register_forward_pre_hook(before, with_kwargs=True),
                             module.register_forward_hook(after, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def first(self, name: str) -> list | None:
        return next((c for c in self.calls if c[0] == name), None)


def first_slip(where: str, what: str, got: Any, expected: torch.Tensor, slips: Slips) -> None:
    """Raise naming the first slip that ``got`` equals (and the reference does not); else compare values."""
    if not isinstance(got, torch.Tensor):
        raise ExerciseError(f"{where}: {what} is a {type(got).__name__}, expected a tensor.")
    if close(got, expected):
        return
    for wrong, hint in slips:
        if close(got, wrong) and not close(wrong, expected):
            raise ExerciseError(f"{where}: {what} is wrong: {hint}.")
    if got.shape != expected.shape:
        raise ExerciseError(f"{where}: {what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}.")
    error = (got.detach().double() - expected.double()).abs()
    i = tuple(int(j) for j in torch.unravel_index(error.argmax(), error.shape))
    raise ExerciseError(f"{where}: {what} has the right shape but wrong values: largest difference "
                        f"{error.max().item():.3g} at index {i} (expected {expected[i].item():.6g}, got {got[i].item():.6g}).")


def run_seeded(f: Callable, *args: Any) -> Any:
    """f(*args) without gradients, the global RNG seeded to ``RNG_SEED`` (and restored afterwards)."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(RNG_SEED)
        return f(*args)


def slips_that_run(*slips: tuple[Callable[[], torch.Tensor], str]) -> Slips:
    """(value, hint) for each (thunk, hint) whose thunk runs: some slips fail on some shapes, as the learner's would."""
    out = []
    for thunk, hint in slips:
        try:
            out.append((thunk(), hint))
        except RuntimeError:
            pass
    return out


def module_case(module: nn.Module, inputs: tuple, steps: Callable, seed: int, train: bool = False) -> Callable[[], tuple]:
    """A ``check_module`` case builder: ``module`` with random weights (default inits leave norms trivial)
    in eval mode (``train``: training mode, dropout active), its inputs, and ``steps(module, *inputs)``,
    the reference's intermediates and slips, computed under ``RNG_SEED``."""
    def build() -> tuple:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            torch.manual_seed(RNG_SEED)
            return module.train(train), inputs, steps(module.train(train), *inputs)
    return build


def check_module(name: str, fn: Callable, reference: Callable, cases: list[tuple[str, Callable]], what: str,
                 calls: Callable, diagnose: Callable) -> Callable:
    """Check ``fn(module, *inputs)``, a module's forward written out by hand, on each case.

    Each case is (label, build) with ``build() -> (module, inputs, steps)`` (the global RNG is restored after it):
    ``steps`` holds the
    reference's intermediates, computed with the global RNG seeded to ``RNG_SEED``; ``fn`` runs under
    the same seed (the RNG is restored afterwards), so that a dropout draws the reference's mask.
    ``calls(where, module, inputs, recorder, error)`` checks the recorded sub-module calls (also when
    ``fn`` raised, ``error``: a wrong call is often why; else ``error`` is None), ``diagnose(where,
    module, inputs, steps, got, recorder)`` the result. A stub hands back ``reference``.
    """
    for label, build in cases:
        with torch.random.fork_rng(devices=[]):  # a module built here draws its initial weights from the global RNG
            module, inputs, steps = build()
        where = f"`{name}` on input {label}"
        try:
            with ModuleRecorder(module) as recorder:
                got = run_seeded(fn, module, *inputs)
        except NotImplementedError:
            return not_written(name, reference)
        except Exception as error:
            calls(f"{where} raised {type(error).__name__}", module, inputs, recorder, error)
            raise ExerciseError(f"`{name}` raised {type(error).__name__}: {error}\n  on input {label}") from error
        if got is None:
            raise ExerciseError(f"{where} returned None: did you forget the `return`?")
        calls(where, module, inputs, recorder, None)
        diagnose(where, module, inputs, steps, got, recorder)
    print(f"✅ `{name}` matches {what} on {len(cases)} inputs.")
    return fn


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

