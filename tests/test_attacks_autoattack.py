"""Parity with AutoAttack (Croce & Hein, ICML 2020, arXiv:2003.01690): APGD's step-size checkpoints
as AutoAttack's code computes them, and the robust accuracy of APGD-CE, APGD-DLR and APGD-T against
AutoAttack's own implementation (the ``pyautoattack`` 0.2.0 package, installed with
``pip install --no-deps pyautoattack==0.2.0``) on a small trained model, at the same budgets."""
from __future__ import annotations

import math

import pytest
import torch

from fastdiv.attacks import APGD, APGDDLR, APGDT, apgd_checkpoints

from test_attacks import accuracy, digits, trained_mlp

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def autoattack_checkpoints(n_iter: int) -> list[int]:
    """Where AutoAttack's APGD loop checks its step size, replayed from its counters: the first
    check after ``max(int(0.22 n), 1)`` iterations, each next window shorter by
    ``max(int(0.03 n), 1)`` down to ``max(int(0.06 n), 1)``; the counter runs over every iteration."""
    window = max(int(0.22 * n_iter), 1)
    least, shrink = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    checks, since = [0], 0
    for i in range(n_iter):
        since += 1
        if since == window:
            checks.append(i + 1)  # after iteration i, i + 1 steps have been taken
            window = max(window - shrink, least)
            since = 0
    return checks


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 50, 100, 1000])
def test_checkpoints_equal_autoattacks(steps):
    assert apgd_checkpoints(steps) == autoattack_checkpoints(steps)


def test_checkpoints_differ_from_the_papers_ceiling_at_20_steps():
    # the paper's ⌈p_j N⌉ would give 5, 9, 12, 14, 16, 18, 19, 20
    assert apgd_checkpoints(20)[:5] == [0, 4, 7, 9, 10]


def test_checkpoints_match_autoattacks_attribute_values():
    """The counters of AutoAttack's own class, where the package is installed."""
    autopgd = pytest.importorskip("pyautoattack.autopgd_base",
                                  reason="AutoAttack's package: pip install --no-deps pyautoattack==0.2.0")
    for steps in (1, 2, 5, 10, 20, 50, 100, 1000):
        aa = autopgd.APGDAttack(torch.nn.Identity(), n_iter=steps, eps=0.1, device="cpu")
        w, h = [0], aa.n_iter_2
        while w[-1] + h <= steps:
            w.append(w[-1] + h)
            h = max(h - aa.size_decr, aa.n_iter_min)
        assert apgd_checkpoints(steps) == w, steps


# ---------------------------------------------------------------------------------------------------
# Robust accuracy versus AutoAttack
# ---------------------------------------------------------------------------------------------------


def two_sigma(p: float, n: int) -> float:
    """Two binomial standard deviations of an accuracy p measured on n examples (p(1 − p) floored
    at 0.01 so that an accuracy near 0 or 1 still gets a few examples of slack)."""
    return 2 * math.sqrt(max(p * (1 - p), 0.01) / n)


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-t"])
def test_robust_accuracy_at_most_autoattacks(name):
    """AutoAttack's budgets (100 iterations, 1 restart; APGD-T: 9 target classes, 1 restart each) on
    the 397 digits test examples at ε = 0.1: fastdiv's robust accuracy is AutoAttack's or lower, up
    to two binomial standard deviations on the 397 examples (the two differ in their random starts
    and in two bookkeeping details, see fastdiv.attacks.apgd). Measured: 0.282 / 0.282 (CE),
    0.307 / 0.305 (DLR), 0.264 / 0.264 (APGD-T), fastdiv / AutoAttack, of a clean 0.972."""
    autopgd = pytest.importorskip("pyautoattack.autopgd_base",
                                  reason="AutoAttack's package: pip install --no-deps pyautoattack==0.2.0")
    model = trained_mlp()
    _, (x, y) = digits()
    eps, steps = 0.1, 100
    if name == "apgd-t":
        theirs = autopgd.APGDAttack_targeted(model, n_iter=steps, eps=eps, n_target_classes=9, n_restarts=1,
                                             seed=0, device="cpu")
        ours = APGDT(model, eps=eps, steps=steps, n_target_classes=9, restarts=1, seed=0)
    else:
        loss = name.split("-")[1]
        theirs = autopgd.APGDAttack(model, n_iter=steps, eps=eps, loss=loss, n_restarts=1, seed=0, device="cpu")
        ours = (APGD if loss == "ce" else APGDDLR)(model, eps=eps, steps=steps, seed=0)
    state = torch.random.get_rng_state()  # AutoAttack seeds the global RNG
    try:
        acc_theirs = accuracy(model, theirs.perturb(x, y), y)
    finally:
        torch.random.set_rng_state(state)
    x_adv = ours(x, y)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    acc_ours = accuracy(model, x_adv, y)
    assert acc_ours < accuracy(model, x, y) - 0.4, acc_ours
    assert acc_ours <= acc_theirs + two_sigma(acc_theirs, len(y)), (acc_ours, acc_theirs)


def test_apgd_t_at_least_as_strong_as_apgd_dlr():
    """Targeting each runner-up class in turn finds at least what the untargeted DLR loss finds
    (up to two binomial standard deviations)."""
    model = trained_mlp()
    _, (x, y) = digits()
    x, y = x[:200], y[:200]
    acc_t = accuracy(model, APGDT(model, eps=0.1, steps=20, n_target_classes=3, seed=0)(x, y), y)
    acc_dlr = accuracy(model, APGDDLR(model, eps=0.1, steps=20, seed=0)(x, y), y)
    assert acc_t <= acc_dlr + two_sigma(acc_dlr, len(y)), (acc_t, acc_dlr)
