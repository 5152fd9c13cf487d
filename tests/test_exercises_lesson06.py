"""Lesson 06's KID exercise: the check accepts correct estimators written in different ways and names
each usual slip."""

import pytest
import torch

from minisd import exercises
from minisd.exercises import ExerciseError
from minisd.metrics import mmd2_unbiased


def kernel(a, b):
    return (a @ b.T / a.shape[1] + 1) ** 3


def masked(x, y):
    """Correct, with masks instead of traces."""
    m, n = len(x), len(y)
    kxx, kyy = kernel(x, x), kernel(y, y)
    off_x = kxx[~torch.eye(m, dtype=torch.bool)].mean()
    off_y = kyy[~torch.eye(n, dtype=torch.bool)].mean()
    return off_x + off_y - 2 * kernel(x, y).mean()


def loops(x, y):
    """Correct, as the double sums of the formula."""
    m, n, D = len(x), len(y), x.shape[1]
    k = lambda a, b: (float(a @ b) / D + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return xx + yy - 2 * sum(k(a, b) for a in x for b in y) / (m * n)


@pytest.mark.parametrize("fn", [masked, loops, lambda x, y: mmd2_unbiased(x, y)])
def test_correct_estimators_pass(fn, capsys):
    assert exercises.check_mmd2_unbiased(fn) is fn
    assert "✅" in capsys.readouterr().out


def test_stub_hands_back_the_reference(capsys):
    def stub(x, y):
        raise NotImplementedError

    reference = exercises.check_mmd2_unbiased(stub)
    x, y = torch.randn(5, 3).double(), torch.randn(4, 3).double()
    assert float(reference(x, y)) == pytest.approx(mmd2_unbiased(x, y))
    assert "not written yet" in capsys.readouterr().out


def v_statistic(x, y):
    return kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()


def wrong_normaliser(x, y):
    kxx, kyy = kernel(x, x), kernel(y, y)
    return (kxx.sum() - kxx.trace()) / len(x) ** 2 + (kyy.sum() - kyy.trace()) / len(y) ** 2 - 2 * kernel(x, y).mean()


def one_cross_term(x, y):
    return masked(x, y) + kernel(x, y).mean()


def no_scaling(x, y):
    k = lambda a, b: (a @ b.T + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    return ((k(x, x).sum() - k(x, x).trace()) / (m * (m - 1)) + (k(y, y).sum() - k(y, y).trace()) / (n * (n - 1))
            - 2 * k(x, y).mean())


def squared_kernel(x, y):
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 2  # noqa: E731
    m, n = len(x), len(y)
    return ((k(x, x).sum() - k(x, x).trace()) / (m * (m - 1)) + (k(y, y).sum() - k(y, y).trace()) / (n * (n - 1))
            - 2 * k(x, y).mean())


@pytest.mark.parametrize("fn, hint", [
    (v_statistic, "diagonal terms .* must be left out"),
    (wrong_normaliser, r"m\(m − 1\) terms, not m²"),
    (one_cross_term, "cross term counts twice"),
    (no_scaling, "divide the dot product by D"),
    (squared_kernel, "kernel is cubic"),
    (lambda x, y: torch.zeros(2), "return one number"),
    (lambda x, y: 0.0, "write the three sums separately"),
])
def test_each_slip_gets_its_hint(fn, hint):
    with pytest.raises(ExerciseError, match=hint):
        exercises.check_mmd2_unbiased(fn)
