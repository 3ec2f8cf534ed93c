"""Parity with torchattacks (installed with ``pip install --no-deps torchattacks``; it imports
scipy and numpy at import time): the same steps as torchattacks' FGSM, BIM, PGD, PGDL2 and MIFGSM
from the same start, and the same robust accuracy as EOTPGD, APGD and Square within sampling noise."""
from __future__ import annotations

import math

import pytest
import torch

from fastdiv.attacks import APGD, APGDDLR, BIM, FGSM, MIFGSM, PGD, PGDL2, Square

from test_attacks import accuracy, noisy_mlp, test_batch, trained_mlp

torchattacks = pytest.importorskip("torchattacks")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def assert_same_steps(got, want, what):
    """Equal up to float32 rounding; a sign step may flip on a gradient element that is zero up to
    rounding (the two compute the mean vs the sum of the batch loss), so allow a few elements."""
    diff = (got - want).abs()
    assert (diff > 1e-5).float().mean() < 1e-3, f"{what}: {int((diff > 1e-5).sum())} elements differ"


def grad_norms(model, x, y):
    leaf = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(leaf), y, reduction="sum"), leaf)
    return g.flatten(1).norm(dim=1)


@pytest.mark.parametrize("case", ["fgsm", "bim", "pgd", "pgd-l2", "mifgsm"])
def test_same_steps_as_torchattacks(case):
    model = trained_mlp()
    x, y = test_batch(64)
    eps, alpha, steps = 0.1, 0.02, 7
    if case == "fgsm":
        ours, theirs = FGSM(model, eps=eps), torchattacks.FGSM(model, eps=eps)
    elif case == "bim":
        ours, theirs = BIM(model, eps=eps, alpha=alpha, steps=steps), torchattacks.BIM(model, eps, alpha, steps)
    elif case == "pgd":
        ours = PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
        theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
    elif case == "pgd-l2":
        # torchattacks divides by ||grad|| + 1e-10 (of the batch-mean loss): keep to examples whose
        # gradient is far above that, where the two must agree
        x, y = test_batch(200)
        x, y = x[grad_norms(model, x, y) > 1e-3][:64], y[grad_norms(model, x, y) > 1e-3][:64]
        ours = PGDL2(model, eps=0.9, alpha=0.2, steps=steps, random_start=False)
        theirs = torchattacks.PGDL2(model, eps=0.9, alpha=0.2, steps=steps, random_start=False)
    else:
        ours = MIFGSM(model, eps=eps, alpha=alpha, steps=steps, decay=1.0)
        theirs = torchattacks.MIFGSM(model, eps=eps, alpha=alpha, steps=steps, decay=1.0)
    got, want = ours(x, y), theirs(x, y)
    assert (want - x).abs().max() > 0
    if case == "pgd-l2":  # torchattacks adds 1e-10 to the gradient norm
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    else:
        assert_same_steps(got, want, case)


def test_same_steps_as_torchattacks_pgd_from_its_random_start():
    """torchattacks' random start injected into ours: then every step is the same."""
    model = trained_mlp()
    x, y = test_batch(32)
    eps = 0.1
    torch.manual_seed(3)
    start = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)  # what torchattacks.PGD draws first
    torch.manual_seed(3)
    want = torchattacks.PGD(model, eps=eps, alpha=0.02, steps=5)(x, y)
    ours = PGD(model, eps=eps, alpha=0.02, steps=5, random_start=True, seed=0)
    ours._random_start = lambda x0, call: start
    assert_same_steps(ours(x, y), want, "pgd from torchattacks' random start")
    assert (PGD(model, eps=eps, alpha=0.02, steps=5, random_start=False)(x, y) - want).abs().max() > 1e-3


def binomial_tolerance(p: float, n: int) -> float:
    """Four standard deviations of the difference of two independent accuracy estimates."""
    return 4 * math.sqrt(2 * max(p * (1 - p), 0.01) / n)


def test_eot_pgd_robust_accuracy_matches_torchattacks_eotpgd():
    model = noisy_mlp(0.3)
    x, y = test_batch(300)
    eps = 0.05
    torch.manual_seed(0)
    theirs = torchattacks.EOTPGD(model, eps=eps, alpha=eps / 4, steps=10, eot_iter=10)(x, y)
    ours = PGD(model, eps=eps, alpha=eps / 4, steps=10, eot="mean", eot_samples=10, seed=0)(x, y)
    torch.manual_seed(1)
    acc_theirs, acc_ours = accuracy(model, theirs, y, samples=20), accuracy(model, ours, y, samples=20)
    clean = accuracy(model, x, y, samples=20)
    assert acc_ours < clean - 0.15 and acc_theirs < clean - 0.15
    assert abs(acc_ours - acc_theirs) <= binomial_tolerance(acc_theirs, len(y)), (acc_ours, acc_theirs)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_robust_accuracy_matches_torchattacks(loss):
    model = trained_mlp()
    x, y = test_batch(300)
    theirs = torchattacks.APGD(model, eps=0.06, steps=20, loss=loss, seed=0)(x, y)
    ours = (APGD if loss == "ce" else APGDDLR)(model, eps=0.06, steps=20, seed=0)(x, y)
    acc_theirs, acc_ours = accuracy(model, theirs, y), accuracy(model, ours, y)
    assert acc_ours < accuracy(model, x, y) - 0.2
    # the same algorithm: as strong, up to the random start
    assert acc_ours <= acc_theirs + 0.02, (acc_ours, acc_theirs)
    assert acc_ours >= acc_theirs - binomial_tolerance(acc_theirs, len(y)), (acc_ours, acc_theirs)


def test_square_robust_accuracy_matches_torchattacks():
    model = trained_mlp()
    x, y = test_batch(300)
    theirs = torchattacks.Square(model, eps=0.06, n_queries=150, p_init=0.8, seed=0)(x, y)
    ours = Square(model, eps=0.06, n_queries=150, p_init=0.8, seed=0)(x, y)
    acc_theirs, acc_ours = accuracy(model, theirs, y), accuracy(model, ours, y)
    assert acc_ours < accuracy(model, x, y) - 0.1
    assert abs(acc_ours - acc_theirs) <= binomial_tolerance(acc_theirs, len(y)), (acc_ours, acc_theirs)


@pytest.mark.parametrize("case", ["pgd", "bim", "mifgsm"])
def test_targeted_same_steps_as_torchattacks_targeted_by_label(case):
    """Targeted mode: torchattacks' ``set_mode_targeted_by_label`` (targets passed in place of the
    labels; each step descends CE toward the target) takes the same steps from the same start."""
    model = trained_mlp()
    x, y = test_batch(64)
    t = (y + 1 + torch.randint(0, 9, y.shape, generator=torch.Generator().manual_seed(0))) % 10
    if case == "pgd":
        ours = PGD(model, eps=0.1, alpha=0.02, steps=7, random_start=False)
        theirs = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=7, random_start=False)
    elif case == "bim":
        ours, theirs = BIM(model, eps=0.1, alpha=0.02, steps=7), torchattacks.BIM(model, 0.1, 0.02, 7)
    else:
        ours = MIFGSM(model, eps=0.1, alpha=0.02, steps=7, decay=1.0)
        theirs = torchattacks.MIFGSM(model, eps=0.1, alpha=0.02, steps=7, decay=1.0)
    theirs.set_mode_targeted_by_label(quiet=True)
    got, want = ours(x, y, target=t), theirs(x, t)
    assert (want - x).abs().max() > 0
    # (not ℓ2: the targeted CE saturates within a few steps, and torchattacks' 1e-10 added to the norm
    # of the batch-mean gradient then changes the step)
    assert_same_steps(got, want, f"targeted {case}")
    # and the targeted run goes elsewhere than the untargeted one
    assert (ours(x, y) - got).abs().max() > 1e-3
