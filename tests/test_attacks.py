"""fastdiv.attacks: threat-model properties of every attack in every EOT mode, batch consistency,
reproducibility, the EOT modes against hand-written references, restarts, transfer attacks, bad
input, and that the attacks hurt a small model trained on sklearn's digits."""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

import fastdiv
from fastdiv.attacks import (
    APGD,
    APGDT,
    ATTACKS,
    BIM,
    FGM,
    FGSM,
    MIFGSM,
    PGD,
    PGDCW,
    PGDL2,
    RFGSM,
    Attack,
    Square,
    SurrogateEnsemble,
    TransferAttack,
    apgd_checkpoints,
    cw_loss,
    dlr_loss,
    ensemble_margin,
    p_selection,
)
from fastdiv.nn import frozen_sample, sampling

from conftest import Noise

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

# ---------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------


@functools.cache
def digits():
    """sklearn's 8x8 digits in [0, 1] as [N, 1, 8, 8]: a fixed 1400 / 397 train / test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return (x[perm[:1400]], y[perm[:1400]]), (x[perm[1400:]], y[perm[1400:]])


@functools.cache
def _trained_mlp() -> nn.Module:
    (x, y), _ = digits()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(100):  # full batch: a fraction of a second
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.random.set_rng_state(gen_state)
    return model.eval().requires_grad_(False)


def trained_mlp() -> nn.Module:
    """A 64-64-10 MLP trained on digits (~97% test accuracy); a fresh copy per call."""
    return copy.deepcopy(_trained_mlp())


def noisy_mlp(sigma: float = 0.3) -> nn.Module:
    """The trained MLP with Gaussian noise injected on the input and the hidden layer."""
    mlp = trained_mlp()
    return nn.Sequential(Noise(sigma), mlp[0], mlp[1], mlp[2], Noise(sigma), mlp[3])


class Counting(nn.Module):
    """``inner``, counting the input rows of its forwards (queries of a score-based attack)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.inner(x)


def test_batch(n=12, offset=0):
    _, (x, y) = digits()
    return x[offset:offset + n].clone(), y[offset:offset + n].clone()


test_batch.__test__ = False  # a helper, not a test


def accuracy(model, x, y, samples=1):
    with torch.no_grad():
        probs = torch.stack([model(x).softmax(-1) for _ in range(samples)]).mean(0)
    return (probs.argmax(1) == y).float().mean().item()


# small settings for every attack: (kwargs, norm)
FAST = {
    "fgsm": {"eps": 0.1},
    "fgm": {"eps": 0.8},
    "rfgsm": {"eps": 0.1},
    "bim": {"eps": 0.1, "steps": 3},
    "pgd": {"eps": 0.1, "steps": 3},
    "pgd-l2": {"eps": 0.8, "steps": 3},
    "mifgsm": {"eps": 0.1, "steps": 3},
    "pgdcw": {"eps": 0.1, "steps": 3},
    "apgd-ce": {"eps": 0.1, "steps": 4},
    "apgd-dlr": {"eps": 0.1, "steps": 4},
    "apgd-t": {"eps": 0.1, "steps": 4, "n_target_classes": 3},
    "fab-t": {"eps": 0.1, "steps": 4, "n_target_classes": 3},
    "square": {"eps": 0.1, "n_queries": 15},
}
L2_ATTACKS = {"fgm", "pgd-l2"}


def make(name, model, **kw):
    return ATTACKS[name](model, **{**FAST[name], **kw})


def assert_in_threat_model(x_adv, x, eps, norm, what=""):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device, what
    assert torch.isfinite(x_adv).all(), what
    assert x_adv.min() >= 0 and x_adv.max() <= 1, f"{what}: outside [0, 1]"
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-6) + 1e-6).all(), f"{what}: {norm} distance {size.max():.6g} > eps {eps}"


# ---------------------------------------------------------------------------------------------------
# Registry and basic contract
# ---------------------------------------------------------------------------------------------------


def test_registry():
    assert set(ATTACKS) == {"fgsm", "fgm", "rfgsm", "bim", "pgd", "pgd-l2", "mifgsm", "pgdcw", "apgd-ce", "apgd-dlr",
                            "apgd-t", "fab-t", "square"}
    assert all(issubclass(c, Attack) for c in ATTACKS.values())
    assert ATTACKS["pgd-l2"](nn.Linear(2, 2)).norm == "l2" and ATTACKS["apgd-dlr"](nn.Linear(2, 2)).loss == "dlr"
    assert ATTACKS["apgd-ce"](nn.Linear(2, 2)).loss == "ce"
    assert set(FAST) == set(ATTACKS)


@pytest.mark.parametrize("eot", ["mean", "one", "fixed"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_threat_model_modes_and_no_mutation(name, eot):
    """Every attack x every EOT mode on a randomized model: inside the ball and [0, 1], same
    shape/dtype/device, inputs untouched, every submodule's train/eval mode restored, the same
    result for the same seed, and the attack moved the input."""
    model = noisy_mlp()
    model.train()
    model[4].eval()  # a mixed state must come back exactly
    modes = [m.training for m in model.modules()]
    x, y = test_batch()
    x_copy, y_copy = x.clone(), y.clone()
    atk = make(name, model, eot=eot, eot_samples=3, seed=5)
    x_adv = atk(x, y)
    assert torch.equal(x, x_copy) and torch.equal(y, y_copy), "inputs were modified"
    assert [m.training for m in model.modules()] == modes, "model modes not restored"
    norm = "l2" if name in L2_ATTACKS else "linf"
    assert_in_threat_model(x_adv, x, atk.eps, norm, f"{name}/{eot}")
    assert (x_adv - x).abs().max() > 0
    torch.testing.assert_close(atk(x, y), x_adv, rtol=0, atol=0)
    assert x_adv.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_empty_batch_and_float64(name):
    model = trained_mlp().double()
    x, y = test_batch(4)
    x = x.double()
    atk = make(name, model, seed=0)
    out = atk(x[:0], y[:0])
    assert out.shape == (0, 1, 8, 8) and out.dtype == torch.float64
    x_adv = atk(x, y)
    assert_in_threat_model(x_adv, x, atk.eps, "l2" if name in L2_ATTACKS else "linf", name)


def test_outputs_on_input_device_and_model_device():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        model = trained_mlp().to(dev)
        x, y = test_batch(4)
        x_adv = PGD(model, eps=0.1, steps=2, seed=0)(x, y)  # computed on the model's device
        assert x_adv.device == x.device


class Spy(nn.Module):
    """Records the training flag of every forward."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


@pytest.mark.parametrize("model_mode, start, expect", [("eval", True, False), ("train", False, True),
                                                       ("keep", True, True), ("keep", False, False)])
def test_model_mode(model_mode, start, expect):
    mlp = trained_mlp()
    spy = Spy()
    model = nn.Sequential(spy, mlp).train(start)
    x, y = test_batch(4)
    PGD(model, eps=0.1, steps=2, model_mode=model_mode, seed=0)(x, y)
    assert spy.seen and all(t == expect for t in spy.seen)
    assert all(m.training == start for m in model.modules())


def test_mc_dropout_in_train_mode_fixed_and_fresh_masks():
    mlp = trained_mlp()
    model = nn.Sequential(mlp[0], mlp[1], mlp[2], nn.Dropout(0.3), mlp[3]).eval()
    x, y = test_batch(8)
    # eval: dropout off, a deterministic model: every mode the same
    a = PGD(model, eps=0.1, steps=3, eot="mean", seed=0)(x, y)
    torch.testing.assert_close(PGD(model, eps=0.1, steps=3, eot="fixed", seed=0)(x, y), a, rtol=0, atol=0)
    # train: fresh dropout masks (the loop strategy), and the mode comes back
    b = PGD(model, eps=0.1, steps=3, eot="mean", eot_samples=4, seed=0, model_mode="train")(x, y)
    assert (a - b).abs().max() > 0 and not model.training
    # [Attack] pins one mask for the whole call (the global RNG re-seeded from the call's seed)
    fixed = PGD(model, eps=0.1, steps=3, eot="fixed", seed=0, model_mode="train")(x, y)
    assert torch.equal(fixed, PGD(model, eps=0.1, steps=3, eot="fixed", seed=0, model_mode="train")(x, y))
    assert not torch.equal(fixed, b)
    with pytest.raises(ValueError, match="strategy='loop'"):
        PGD(model, eps=0.1, steps=3, strategy="batched", model_mode="train")(x, y)


# ---------------------------------------------------------------------------------------------------
# Hand-written references
# ---------------------------------------------------------------------------------------------------


def ce_grad(model, x, y):
    leaf = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(leaf), y, reduction="sum"), leaf)
    return g


def reference_pgd(model, x, y, eps, alpha, steps, start=None):
    """Madry et al.'s l_inf PGD as it reads, on a deterministic model."""
    x_adv = x.clone() if start is None else start.clone()
    for _ in range(steps):
        g = ce_grad(model, x_adv, y)
        x_adv = (x + (x_adv + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv


def step_seeds(seed, count):
    """The seeds an attack with ``seed`` draws: the fixed-sample seed first, then one per step."""
    gen = torch.Generator().manual_seed(seed)
    return [int(torch.randint(0, 2**62, (), generator=gen)) for _ in range(count)]


def reference_eot_pgd(model, x, y, eps, alpha, steps, n, seeds, fixed=False):
    """EOT-PGD with the loop: sample model s of step t is sampling(model, n, seeds[t], index=s)."""
    x_adv = x.clone()
    for t in range(steps):
        seed = seeds[0] if fixed else seeds[1 + t]
        g = torch.zeros_like(x)
        for s in range(n):
            leaf = x_adv.clone().requires_grad_(True)
            with sampling(model, n, seed, index=s):
                loss = nn.functional.cross_entropy(model(leaf), y, reduction="sum")
            g += torch.autograd.grad(loss, leaf)[0]
        x_adv = (x + (x_adv + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv


def test_pgd_matches_reference_on_deterministic_model_in_every_mode():
    model = trained_mlp().double()
    x, y = test_batch(16)
    x = x.double()
    want = reference_pgd(model, x, y, 0.1, 0.02, 5)
    for eot in ("mean", "one", "fixed"):
        got = PGD(model, eps=0.1, alpha=0.02, steps=5, random_start=False, eot=eot, eot_samples=6, seed=0)(x, y)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=eot)
    # with a random start: the start is drawn the same way in every mode, so all modes agree
    runs = [PGD(model, eps=0.1, alpha=0.02, steps=5, eot=eot, seed=3)(x, y) for eot in ("mean", "one", "fixed")]
    for r in runs[1:]:
        torch.testing.assert_close(r, runs[0], rtol=0, atol=1e-12)
    assert (runs[0] - want).abs().max() > 0


@pytest.mark.parametrize("strategy", ["batched", "loop"])
@pytest.mark.parametrize("eot", ["mean", "one", "fixed"])
def test_eot_pgd_matches_loop_reference(eot, strategy):
    """The EOT modes on a randomized model against the loop definition, seed by seed."""
    model = noisy_mlp(0.4).double()
    x, y = test_batch(10)
    x = x.double()
    n = 4 if eot == "mean" else 1
    seeds = step_seeds(9, 7)
    want = reference_eot_pgd(model, x, y, 0.1, 0.03, 5, n, seeds, fixed=eot == "fixed")
    got = PGD(model, eps=0.1, alpha=0.03, steps=5, random_start=False, eot=eot, eot_samples=4, seed=9,
              strategy=strategy)(x, y)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_fixed_mode_is_the_attack_on_one_sample_model():
    """eot='fixed' attacks one sample model: inside frozen_sample every mode is that model, and on
    its own 'fixed' differs from EOT over fresh samples."""
    model = noisy_mlp(0.4).double()
    x, y = test_batch(10)
    x = x.double()
    with frozen_sample(model, seed=77):
        runs = [PGD(model, eps=0.1, steps=4, eot=eot, eot_samples=3, seed=1)(x, y) for eot in ("fixed", "one", "mean")]
    for r in runs[1:]:
        torch.testing.assert_close(r, runs[0], rtol=0, atol=1e-12)
    fixed = PGD(model, eps=0.1, steps=4, eot="fixed", seed=1)(x, y)
    mean = PGD(model, eps=0.1, steps=4, eot="mean", eot_samples=3, seed=1)(x, y)
    assert (fixed - mean).abs().max() > 0


def test_strategies_agree():
    """'auto', 'batched' and 'loop' give the same attack (gradients and the restarts' margins)."""
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), Noise(0.3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).double()
    x, y = test_batch(6)
    x = x.double()
    for model in (cnn, noisy_mlp().double()):
        for cls, kw in ((APGD, {"steps": 4, "restarts": 2}), (Square, {"n_queries": 6, "restarts": 2})):
            runs = [cls(model, eps=0.1, eot_samples=3, seed=0, strategy=s, **kw)(x, y)
                    for s in ("auto", "batched", "loop")]
            for r in runs[1:]:
                torch.testing.assert_close(r, runs[0], rtol=0, atol=1e-12)


def test_seed_none_uses_the_global_rng():
    model = noisy_mlp()
    x, y = test_batch(6)
    atk = PGD(model, eps=0.1, steps=2)
    torch.manual_seed(4)
    a = atk(x, y)
    torch.manual_seed(4)
    b = atk(x, y)
    c = atk(x, y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 0


def test_fgsm_fgm_rfgsm_bim_mifgsm_formulas():
    model = trained_mlp().double()
    x, y = test_batch(8)
    x = x.double()
    g = ce_grad(model, x, y)
    torch.testing.assert_close(FGSM(model, eps=0.1)(x, y), (x + 0.1 * g.sign()).clamp(0, 1))
    unit = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(FGM(model, eps=0.7)(x, y), (x + 0.7 * unit).clamp(0, 1))
    torch.testing.assert_close(BIM(model, eps=0.1, steps=4)(x, y), reference_pgd(model, x, y, 0.1, 0.025, 4))
    # R-FGSM: the random step is the first U[0,1) draw after the fixed-sample seed
    gen = torch.Generator().manual_seed(2)
    torch.randint(0, 2**62, (), generator=gen)
    u = torch.rand(x.shape, generator=gen, dtype=torch.float64)
    for random, delta in (("uniform", (2 * u - 1) * 0.04), ("sign", torch.where(u < 0.5, -0.04, 0.04))):
        x1 = (x + delta).clamp(0, 1)
        want = (x + (x1 + 0.06 * ce_grad(model, x1, y).sign() - x).clamp(-0.1, 0.1)).clamp(0, 1)
        torch.testing.assert_close(RFGSM(model, eps=0.1, alpha=0.04, random=random, seed=2)(x, y), want)
    # MI-FGSM: g <- mu g + grad / ||grad||_1
    x_adv, m = x.clone(), torch.zeros_like(x)
    for _ in range(4):
        gr = ce_grad(model, x_adv, y)
        m = 0.5 * m + gr / gr.abs().flatten(1).sum(1).view(-1, 1, 1, 1)
        x_adv = (x + (x_adv + 0.03 * m.sign() - x).clamp(-0.1, 0.1)).clamp(0, 1)
    torch.testing.assert_close(MIFGSM(model, eps=0.1, alpha=0.03, steps=4, decay=0.5)(x, y), x_adv)


def test_pgd_l2_reference():
    model = trained_mlp().double()
    x, y = test_batch(8)
    x = x.double()
    x_adv = x.clone()
    for _ in range(4):
        g = ce_grad(model, x_adv, y)
        d = x_adv + 0.3 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) - x
        d = d * (1.0 / d.flatten(1).norm(dim=1)).clamp(max=1 / 0.8).mul(0.8).clamp(max=1).view(-1, 1, 1, 1)
        x_adv = (x + d).clamp(0, 1)
    got = PGDL2(model, eps=0.8, alpha=0.3, steps=4, random_start=False)(x, y)
    torch.testing.assert_close(got, x_adv)


def test_losses_by_hand():
    z = torch.tensor([[3.0, 1.0, 2.0, -1.0], [0.0, 5.0, 1.0, 4.0]])
    y = torch.tensor([0, 3])
    # cw: min(max_{j!=y} z_j - z_y, kappa)
    torch.testing.assert_close(cw_loss(0.0)(z, y), torch.tensor([-1.0, 0.0]))
    torch.testing.assert_close(cw_loss(50.0)(z, y), torch.tensor([-1.0, 1.0]))
    # dlr: -(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3)
    torch.testing.assert_close(dlr_loss(z, y), torch.tensor([-(3 - 2) / (3 - 1.0), -(4 - 5) / (5 - 1.0)]))
    with pytest.raises(ValueError, match="at least 3 classes"):
        dlr_loss(z[:, :2], torch.tensor([0, 1]))
    logits = torch.stack([z, z + torch.tensor([0.0, 0, 0, 10])])  # two sample models
    p = logits.softmax(-1).mean(0)
    want = torch.stack([torch.cat([p[i, :c], p[i, c + 1:]]).max() - p[i, c] for i, c in enumerate(y.tolist())])
    torch.testing.assert_close(ensemble_margin(logits, y), want)


def test_pgdcw_uses_the_hinge():
    model = trained_mlp().double()
    x, y = test_batch(8)
    x = x.double()
    got = PGDCW(model, eps=0.1, alpha=0.02, steps=3, random_start=False, confidence=5.0)(x, y)
    x_adv = x.clone()
    for _ in range(3):
        leaf = x_adv.clone().requires_grad_(True)
        z = model(leaf)
        true = z.gather(1, y[:, None]).squeeze(1)
        other = z.masked_fill(nn.functional.one_hot(y, 10).bool(), -math.inf).amax(1)
        (g,) = torch.autograd.grad((other - true).clamp(max=5.0).sum(), leaf)
        x_adv = (x + (x_adv + 0.02 * g.sign() - x).clamp(-0.1, 0.1)).clamp(0, 1)
    torch.testing.assert_close(got, x_adv)


# ---------------------------------------------------------------------------------------------------
# Batch consistency
# ---------------------------------------------------------------------------------------------------

DETERMINISTIC = {
    "fgsm": {}, "fgm": {}, "bim": {}, "mifgsm": {},
    "pgd": {"random_start": False}, "pgd-l2": {"random_start": False}, "pgdcw": {"random_start": False},
    "apgd-ce": {"random_start": False, "steps": 12}, "apgd-dlr": {"random_start": False, "steps": 12},
}


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_batch_consistency(name):
    """An example attacked inside a batch gives what it gives attacked alone (deterministic model,
    no random start; APGD's per-example step sizes and checkpoints included)."""
    model = trained_mlp().double()
    x, y = test_batch(9)
    x = x.double()
    atk = make(name, model, seed=0, **DETERMINISTIC[name])
    batch = atk(x, y)
    for i in (0, 4, 8):
        torch.testing.assert_close(atk(x[i:i + 1], y[i:i + 1]), batch[i:i + 1], rtol=0, atol=1e-10)
    torch.testing.assert_close(atk(x[2:7], y[2:7]), batch[2:7], rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# APGD, Square, restarts
# ---------------------------------------------------------------------------------------------------


def test_apgd_checkpoints_as_in_autoattack():
    # at N = 100 AutoAttack's integer steps 22, 19, 16, 13, 10, 7, 6, 6 give the paper's ⌈p_j N⌉
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    # at N = 10 they differ: AutoAttack checks after 2 steps, then after every step (the paper: 3, 5, 6, ...)
    assert apgd_checkpoints(10) == [0, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert apgd_checkpoints(20) == [0, 4, 7, 9, *range(10, 21)]
    assert apgd_checkpoints(1) == [0, 1]


class Linear2(nn.Module):
    """z = [w.x, -w.x]: CE of class 0 increases along -w, so the l_inf optimum is a corner."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 16, dtype=torch.float64).view(1, 1, 4, 4))

    def forward(self, x):
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([s, -s], 1)


def test_apgd_finds_the_corner_of_a_linear_model():
    model = Linear2()
    x = torch.full((3, 1, 4, 4), 0.5, dtype=torch.float64)
    x[1] = 0.95  # the box clips part of the corner
    y = torch.zeros(3, dtype=torch.long)
    corner = (x - 0.1 * model.w.sign()).clamp(0, 1)
    for atk in (APGD(model, eps=0.1, steps=10, seed=0), APGD(model, eps=0.1, steps=10, random_start=False),
                PGD(model, eps=0.1, alpha=0.05, steps=5, seed=0)):
        torch.testing.assert_close(atk(x, y), corner, rtol=0, atol=1e-12)


def test_apgd_at_least_as_strong_as_its_start_and_pgd():
    model = trained_mlp()
    x, y = test_batch(120)
    clean_loss = nn.functional.cross_entropy(model(x), y, reduction="none")
    x_adv = APGD(model, eps=0.06, steps=20, seed=0)(x, y)
    with torch.no_grad():
        adv_loss = nn.functional.cross_entropy(model(x_adv), y, reduction="none")
    wrong = model(x_adv).argmax(1) != y
    # per example: a misclassified point or the best loss found, never worse than the clean input
    assert ((adv_loss >= clean_loss - 1e-6) | wrong).all()
    pgd = PGD(model, eps=0.06, steps=20, seed=0)(x, y)
    assert accuracy(model, x_adv, y) <= accuracy(model, pgd, y) + 0.02


def test_square_schedule_and_budget():
    assert p_selection(0.8, 0, 10000) == 0.8 and p_selection(0.8, 11, 10000) == 0.4
    assert p_selection(0.8, 9000, 10000) == 0.8 / 512 and p_selection(0.8, 50, 100) == 0.8 / 128

    model = Counting(trained_mlp())
    x, y = test_batch(10)
    x_adv = Square(model, eps=0.05, n_queries=30, seed=0, stochastic=False)(x, y)
    assert model.rows <= 30 * 10  # at most n_queries evaluations per example
    # undeclared, the randomness probe adds its two forwards of PROBE_EXAMPLES examples, nothing else
    probed = Counting(model.inner)
    assert torch.equal(Square(probed, eps=0.05, n_queries=30, seed=0)(x, y), x_adv)
    assert probed.rows == model.rows + 2 * fastdiv.nn.PROBE_EXAMPLES
    with torch.no_grad():
        z0, z = model.inner(x), model.inner(x_adv)
    margin = lambda z: z.gather(1, y[:, None]).squeeze(1) - z.masked_fill(
        nn.functional.one_hot(y, 10).bool(), -math.inf).amax(1)
    # accepted changes only ever lower the margin: below the clean margin or at least fooled
    assert ((margin(z) <= margin(z0) + 1e-5) | (margin(z) < 0)).all()


def test_restarts_keep_the_worst_case():
    model = trained_mlp()
    x, y = test_batch(150)
    one = PGD(model, eps=0.07, alpha=0.01, steps=2, seed=0)
    three = PGD(model, eps=0.07, alpha=0.01, steps=2, seed=0, restarts=4)
    with torch.no_grad():
        m1 = ensemble_margin(model(one(x, y))[None], y)
        m3 = ensemble_margin(model(three(x, y))[None], y)
    # the first restart is the single run (the same draws), later ones can only raise the margin
    assert (m3 >= m1 - 1e-6).all() and (m3 > m1 + 1e-6).any()
    assert ((m1 > 0) <= (m3 > 0)).all()


# ---------------------------------------------------------------------------------------------------
# Transfer
# ---------------------------------------------------------------------------------------------------


def surrogates(k=3):
    torch.manual_seed(1)
    return [nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double() for _ in range(k)]


def test_transfer_attack_is_pgd_on_the_average_ce():
    members = surrogates()
    x, y = test_batch(8)
    x = x.double()
    x_adv = x.clone()
    for _ in range(3):
        leaf = x_adv.clone().requires_grad_(True)
        loss = sum(nn.functional.cross_entropy(m(leaf), y) for m in members) / len(members)
        (g,) = torch.autograd.grad(loss, leaf)
        x_adv = (x + (x_adv + 0.02 * g.sign() - x).clamp(-0.1, 0.1)).clamp(0, 1)
    for strategy in ("batched", "loop"):
        atk = TransferAttack(members, "pgd", eps=0.1, alpha=0.02, steps=3, random_start=False, strategy=strategy)
        torch.testing.assert_close(atk(x, y), x_adv, rtol=0, atol=1e-12)
    # twice the samples (each surrogate twice) is the same average
    atk = TransferAttack(members, PGD, eps=0.1, alpha=0.02, steps=3, random_start=False, eot_samples=6)
    torch.testing.assert_close(atk(x, y), x_adv, rtol=0, atol=1e-12)
    ens = SurrogateEnsemble(members)
    probs = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
    torch.testing.assert_close(ens(x), probs.log())


def test_transfer_attack_transfers_and_handles_randomized_surrogates():
    target = trained_mlp()
    x, y = test_batch(150)
    surrogate_models = [trained_mlp(), noisy_mlp(0.2)]
    x_adv = TransferAttack(surrogate_models, MIFGSM, eps=0.12, steps=5, seed=0)(x, y)
    assert_in_threat_model(x_adv, x, 0.12, "linf")
    assert accuracy(target, x_adv, y) < accuracy(target, x, y) - 0.4
    with pytest.raises(ValueError, match="eot='mean'"):
        TransferAttack(surrogate_models, PGD, eot="one")
    with pytest.raises(ValueError, match="multiple of the 2 surrogates"):
        TransferAttack(surrogate_models, PGD, eot_samples=3)
    with pytest.raises(ValueError, match="at least one surrogate"):
        TransferAttack([], PGD)
    with pytest.raises(ValueError, match="attack_cls must be"):
        TransferAttack(surrogate_models, "cw")
    with pytest.raises(TypeError, match="attack_cls must be"):
        TransferAttack(surrogate_models, nn.Linear)


def test_transfer_attack_takes_the_members_of_an_ensemble():
    members = surrogates()
    x, y = test_batch(8)
    x = x.double()
    want = TransferAttack(members, PGD, eps=0.1, steps=3, random_start=False)(x, y)
    ensemble = fastdiv.nn.Ensemble(members)
    atk = TransferAttack(ensemble, PGD, eps=0.1, steps=3, random_start=False)
    assert len(atk.surrogate.members) == 3
    torch.testing.assert_close(atk(x, y), want, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Effect on a trained model
# ---------------------------------------------------------------------------------------------------


def test_attacks_reduce_accuracy_of_a_trained_model():
    model = trained_mlp()
    x, y = test_batch(200)
    clean = accuracy(model, x, y)
    assert clean > 0.9
    acc = {}
    for name in ATTACKS:
        kw = {"eps": 1.2} if name in L2_ATTACKS else {"eps": 0.15}
        if name.startswith("apgd"):
            kw["steps"] = 20
        if name == "square":
            kw["n_queries"] = 300
        acc[name] = accuracy(model, ATTACKS[name](model, seed=0, **kw)(x, y), y)
    assert all(a < 0.5 for a in acc.values()), acc
    for name in ("bim", "pgd", "mifgsm", "pgdcw", "apgd-ce", "apgd-dlr"):
        assert acc[name] <= acc["fgsm"] + 0.01, acc
    assert acc["pgd-l2"] <= acc["fgm"] + 0.01, acc


def test_eot_pgd_beats_fixed_on_a_noisy_model():
    """Against fresh samples, averaging gradients over samples transfers better than attacking one."""
    model = noisy_mlp(0.3)
    x, y = test_batch(200)
    fixed = PGD(model, eps=0.08, steps=10, eot="fixed", seed=0)(x, y)
    mean = PGD(model, eps=0.08, steps=10, eot="mean", eot_samples=10, seed=0)(x, y)
    torch.manual_seed(0)
    acc_fixed, acc_mean = accuracy(model, fixed, y, samples=20), accuracy(model, mean, y, samples=20)
    assert acc_mean < acc_fixed, (acc_mean, acc_fixed)


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


def three_class_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).requires_grad_(False)


class ThreeD(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10].unsqueeze(1)


@pytest.mark.parametrize("make_attack, call, error, match", [
    (lambda m: PGD(m, eps=-0.1), None, ValueError, "eps must be"),
    (lambda m: PGD(m, steps=0), None, ValueError, "steps must be an int >= 1"),
    (lambda m: APGD(m, steps=0), None, ValueError, "steps must be an int >= 1"),
    (lambda m: BIM(m, steps=1.5), None, ValueError, "steps must be"),
    (lambda m: PGD(m, eot_samples=0), None, ValueError, "eot_samples must be an int >= 1"),
    (lambda m: PGD(m, eot="all"), None, ValueError, "eot must be one of"),
    (lambda m: PGD(m, norm="l1"), None, ValueError, "norm must be one of"),
    (lambda m: FGSM(m, norm="l2"), None, ValueError, "norm must be one of"),
    (lambda m: PGD(m, alpha=-1.0), None, ValueError, "alpha must be"),
    (lambda m: PGD(m, restarts=0), None, ValueError, "restarts must be"),
    (lambda m: PGD(m, seed=1.5), None, TypeError, "seed must be an int"),
    (lambda m: PGD(m, strategy="vmap"), None, ValueError, "strategy must be one of"),
    (lambda m: PGD(m, model_mode="test"), None, ValueError, "model_mode must be one of"),
    (lambda m: PGD(m, loss="hinge"), None, ValueError, "loss must be one of"),
    (lambda m: PGD("model"), None, TypeError, "model must be an nn.Module"),
    (lambda m: RFGSM(m, eps=0.1, alpha=0.2), None, ValueError, "alpha .* must be <= eps"),
    (lambda m: MIFGSM(m, decay=-1.0), None, ValueError, "decay must be"),
    (lambda m: Square(m, n_queries=0), None, ValueError, "n_queries must be"),
    (lambda m: Square(m, p_init=1.5), None, ValueError, "p_init must be"),
    (lambda m: APGD(m, loss="margin"), None, ValueError, "loss must be one of"),
    (lambda m: PGDCW(m, loss="ce"), None, TypeError, "CW hinge"),
    (lambda m: PGD(m), lambda x, y: (x + 1.0, y), ValueError, r"images must lie in \[0, 1\]"),
    (lambda m: PGD(m), lambda x, y: (x - 0.01, y), ValueError, r"images must lie in \[0, 1\]"),
    (lambda m: PGD(m), lambda x, y: (x.long(), y), TypeError, "images must be a floating-point"),
    (lambda m: PGD(m), lambda x, y: (x[0, 0, 0], y), ValueError, "images must be a batch"),
    (lambda m: Square(m), lambda x, y: (x.flatten(1), y), ValueError, r"images must be a batch \[B, C, H, W\]"),
    (lambda m: PGD(m), lambda x, y: (x, y[:-1]), ValueError, "labels must have shape"),
    (lambda m: PGD(m), lambda x, y: (x, y.float()), TypeError, "labels must be an integer tensor"),
    (lambda m: PGD(m), lambda x, y: (x, y - 20), ValueError, "labels must be class indices >= 0"),
    (lambda m: PGD(m), lambda x, y: (x, y + 10), ValueError, r"PGD: .*labels y must be in \[0, 10\)"),
    (lambda m: APGD(m, steps=2), lambda x, y: (x, y + 10), ValueError, r"APGD: .*labels y must be in \[0, 10\)"),
    (lambda m: Square(m, n_queries=2), lambda x, y: (x, y + 10), ValueError, r"Square: labels must be in \[0, 10\)"),
    (lambda m: PGD(ThreeD()), None, ValueError, r"PGD: .*logits \[N, C\]"),
    # targeted mode
    (lambda m: PGD(m), lambda x, y: (x, y, y.clone()), ValueError, "target must differ from the true label"),
    (lambda m: APGD(m, steps=2), lambda x, y: (x, y, torch.where(torch.arange(4) == 2, y, (y + 1) % 10)),
     ValueError, "equals the label at 1 example.*index 2"),
    (lambda m: PGD(m), lambda x, y: (x, y, (y + 1) % 10 + 10), ValueError, r"PGD: target must be in \[0, 10\)"),
    (lambda m: APGD(m, steps=2), lambda x, y: (x, y, torch.full_like(y, 10) + (y == 10)), ValueError,
     r"APGD: target must be in \[0, 10\)"),
    (lambda m: FGSM(m), lambda x, y: (x, y, y - 20), ValueError, "target must be class indices >= 0"),
    (lambda m: PGD(m), lambda x, y: (x, y, (y + 1).float()), TypeError, "target must be an integer tensor"),
    (lambda m: PGD(m), lambda x, y: (x, y, (y + 1)[:-1]), ValueError, "target must have shape"),
    (lambda m: Square(m), lambda x, y: (x, y, (y + 1) % 10), TypeError, "Square: no targeted mode"),
    (lambda m: APGDT(m), lambda x, y: (x, y, (y + 1) % 10), TypeError, "APGDT: no targeted mode"),
    (lambda m: APGDT(m, loss="ce"), None, TypeError, "targeted DLR loss"),
    (lambda m: APGDT(m, n_target_classes=0), None, ValueError, "n_target_classes must be an int >= 1"),
    (lambda m: APGDT(three_class_model(), steps=2), lambda x, y: (x, y % 3), ValueError,
     "APGDT: the targeted DLR loss needs at least 4 classes, the model has 3"),
    (lambda m: APGD(three_class_model(), steps=2, loss="dlr"), lambda x, y: (x, y % 3, (y + 1) % 3), ValueError,
     "APGD: .*targeted DLR loss needs at least 4 classes, the model has 3"),
    (lambda m: Square(ThreeD(), n_queries=2), None, ValueError, r"Square: .*logits \[N, C\]"),
])
def test_bad_input(make_attack, call, error, match):
    model = noisy_mlp()
    x, y = test_batch(4)
    model.train()
    with pytest.raises(error, match=match):
        atk = make_attack(model)
        atk(*(call(x, y) if call else (x, y)))
    assert model.training and all(m.training for m in model.modules()), "mode not restored after an error"


def test_range_tolerance():
    model = trained_mlp()
    x, y = test_batch(4)
    x = x.clone()
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 1 + 5e-7, -5e-7  # float rounding of a normalization: accepted
    assert_in_threat_model(FGSM(model, eps=0.1)(x, y), x.clamp(0, 1), 0.1 + 1e-6, "linf")


# ---------------------------------------------------------------------------------------------------
# Models that return NaN or Inf logits; the [0, 1] box
# ---------------------------------------------------------------------------------------------------


class NonFinite(nn.Module):
    """The trained MLP, with NaN (or +Inf in one class) logits for the inputs whose first pixel is above
    0.5: the corner pixel, 0 in every digit, set to 1 in the examples that should get them (an eps = 0.1
    attack cannot move it across 0.5)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.inner, self.value = trained_mlp(), value

    def forward(self, x):
        out = self.inner(x)
        marked = x.flatten(1)[:, :1] > 0.5
        if math.isnan(self.value):
            return torch.where(marked, torch.full_like(out, math.nan), out)
        return torch.where(marked & (torch.arange(out.shape[1]) == 3), torch.full_like(out, self.value), out)


def marked_batch(rows=(3, 7)):
    x, y = test_batch(10)
    assert (x[:, 0, 0, 0] == 0).all()
    x[list(rows), 0, 0, 0] = 1.0
    return x, y


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_non_finite_logits_raise(name, value):
    """Every attack stops at the first forward that returns NaN or Inf logits (here the first of the call)
    with a ValueError naming the attack, the number of such examples and the first one's index, in every
    EOT mode and targeted; it never returns a NaN image or one outside [0, 1]."""
    model = NonFinite(value)
    x, y = marked_batch()
    cls = ATTACKS[name]
    message = (rf"^{cls.__name__}: the model returned non-finite logits \(NaN or Inf\) for 2 example\(s\) of "
               r"the batch, first index 3")
    for eot in ("mean", "fixed"):
        with pytest.raises(ValueError, match=message):
            make(name, model, eot=eot, eot_samples=2, seed=0)(x, y)
    if cls.supports_target:
        with pytest.raises(ValueError, match=message):
            make(name, model, seed=0)(x, y, target=targets_for(y))
    # the others alone are attacked as usual
    keep = torch.tensor([i not in (3, 7) for i in range(10)])
    atk = make(name, model, seed=0)
    assert_in_threat_model(atk(x[keep], y[keep]), x[keep], atk.eps, "l2" if name in L2_ATTACKS else "linf", name)


class NanOnSubsets(nn.Module):
    """The trained MLP, with NaN logits near example 5 of the batch x0 whenever the forward sees fewer
    rows than x0 has: only the forwards of an attack that work on the examples not yet fooled."""

    def __init__(self, x0) -> None:
        super().__init__()
        self.inner, self.rows, self.row = trained_mlp(), x0.shape[0], x0[5].flatten()

    def forward(self, x):
        out = self.inner(x)
        if x.shape[0] >= self.rows:
            return out
        near = (x.flatten(1) - self.row).abs().amax(1, keepdim=True) < 0.3
        return torch.where(near, torch.full_like(out, math.nan), out)


@pytest.mark.parametrize("make_attack", [
    lambda m: PGD(m, eps=0.1, steps=2, restarts=2, seed=0, eot="fixed", stochastic=False),
    lambda m: Square(m, eps=0.1, n_queries=5, seed=0, eot="fixed", stochastic=False),
    lambda m: ATTACKS["fab-t"](m, **FAST["fab-t"], seed=0, eot="fixed", stochastic=False),
    lambda m: TransferAttack([m], PGD, eps=0.1, steps=2, restarts=2, seed=0),
], ids=["pgd-restarts", "square", "fab-t", "transfer"])
def test_non_finite_logits_on_a_subset_name_the_callers_example(make_attack):
    """NaN logits first seen in a forward on a subset of the batch (the examples not yet fooled: examples
    0-2 have wrong labels, so they count as fooled from the start): the error still gives the index of the
    example in the caller's batch."""
    x, y = test_batch(10)
    y[:3] = (y[:3] + 1) % 10
    with pytest.raises(ValueError, match=r"non-finite logits \(NaN or Inf\) for 1 example\(s\) of the batch, "
                                         r"first index 5"):
        make_attack(NanOnSubsets(x))(x, y)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_stay_in_the_box_at_its_corners(name):
    """Images at 0 and 1 everywhere (every step pushes out of the box) and in between: every attack, also
    targeted, returns values in [0, 1] and finite."""
    model = trained_mlp()
    x, y = test_batch(6)
    x[0], x[1], x[2] = 0.0, 1.0, (x[2] > 0.5).float()
    atk = make(name, model, seed=0)
    norm = "l2" if name in L2_ATTACKS else "linf"
    assert_in_threat_model(atk(x, y), x, atk.eps, norm, name)
    if atk.supports_target:
        assert_in_threat_model(atk(x, y, target=targets_for(y)), x, atk.eps, norm, f"{name} targeted")


# ---------------------------------------------------------------------------------------------------
# Targeted mode
# ---------------------------------------------------------------------------------------------------

TARGETED = ["fgsm", "fgm", "rfgsm", "bim", "pgd", "pgd-l2", "mifgsm", "pgdcw", "apgd-ce", "apgd-dlr"]


def targets_for(y, seed=0):
    """A target per example, never its label."""
    return (y + 1 + torch.randint(0, 9, y.shape, generator=torch.Generator().manual_seed(seed))) % 10


def hits(model, x, t, samples=1):
    with torch.no_grad():
        probs = torch.stack([model(x).softmax(-1) for _ in range(samples)]).mean(0)
    return probs.argmax(1) == t


@pytest.mark.parametrize("name", TARGETED)
def test_targeted_mode_moves_toward_the_target(name):
    """Every gradient attack has a targeted mode: in the threat model, and far more examples end up
    classified as their target than after the untargeted attack of the same budget."""
    model = trained_mlp()
    x, y = test_batch(100)
    t = targets_for(y)
    kw = {"eps": 2.0} if name in L2_ATTACKS else {"eps": 0.2}
    if name not in ("fgsm", "fgm", "rfgsm"):
        kw["steps"] = 10
    atk = ATTACKS[name](model, seed=0, **kw)
    assert atk.supports_target
    x_tgt = atk(x, y, target=t)
    assert_in_threat_model(x_tgt, x, atk.eps, "l2" if name in L2_ATTACKS else "linf", name)
    hit_targeted, hit_untargeted = hits(model, x_tgt, t).float().mean(), hits(model, atk(x, y), t).float().mean()
    assert hit_targeted > hit_untargeted + 0.1, (name, hit_targeted, hit_untargeted)
    if name not in ("fgsm", "fgm", "rfgsm"):
        assert hit_targeted > 0.5, (name, hit_targeted)


def test_targeted_pgd_and_pgdcw_against_references():
    """Targeted PGD descends CE(z, t) (ascends −CE); targeted PGD-CW ascends min(z_t − max_{j≠t} z_j, κ)."""
    model = trained_mlp().double()
    x, y = test_batch(16)
    x, t = x.double(), targets_for(y)

    def reference(objective):
        x_adv = x.clone()
        for _ in range(3):
            leaf = x_adv.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(objective(model(leaf)).sum(), leaf)
            x_adv = (x + (x_adv + 0.02 * g.sign() - x).clamp(-0.1, 0.1)).clamp(0, 1)
        return x_adv

    def hinge(z):
        other = z.masked_fill(nn.functional.one_hot(t, 10).bool(), -math.inf).amax(1)
        return (z.gather(1, t[:, None]).squeeze(1) - other).clamp(max=5.0)

    got = PGD(model, eps=0.1, alpha=0.02, steps=3, random_start=False)(x, y, target=t)
    torch.testing.assert_close(got, reference(lambda z: -nn.functional.cross_entropy(z, t, reduction="none")))
    got = PGDCW(model, eps=0.1, alpha=0.02, steps=3, random_start=False, confidence=5.0)(x, y, target=t)
    torch.testing.assert_close(got, reference(hinge))


def test_targeted_dlr_loss_formula():
    z = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 5.0, 1.0, 3.0, 2.0]])
    y, t = torch.tensor([0, 1]), torch.tensor([2, 3])
    # −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2)
    want = torch.tensor([-(4.0 - 2.0) / (4.0 - (2.0 + 1.0) / 2), -(5.0 - 3.0) / (5.0 - (2.0 + 1.0) / 2)])
    torch.testing.assert_close(fastdiv.attacks.dlr_targeted_loss(y)(z, t), want)
    # labels of a batch replicated over 3 sample models are y tiled
    torch.testing.assert_close(fastdiv.attacks.dlr_targeted_loss(y)(z.repeat(3, 1), t.repeat(3)), want.repeat(3))


@pytest.mark.parametrize("eot", ["mean", "one", "fixed"])
def test_targeted_eot_pgd_on_a_noisy_model(eot):
    """Targeted mode works through sample_input_grads' EOT: the ensemble prediction moves to the target."""
    model = noisy_mlp(0.3)
    x, y = test_batch(60)
    t = targets_for(y)
    x_tgt = PGD(model, eps=0.2, steps=10, eot=eot, eot_samples=5, seed=0)(x, y, target=t)
    assert_in_threat_model(x_tgt, x, 0.2, "linf", eot)
    torch.manual_seed(0)
    assert hits(model, x_tgt, t, samples=20).float().mean() > 0.4


@pytest.mark.parametrize("cls, kw", [(PGD, {"steps": 3, "eps": 0.06}), (APGD, {"steps": 4, "eps": 0.06})])
def test_targeted_restarts_keep_target_hits(cls, kw):
    """Restarts judge success as "classified as the target": every example that reached its target
    in the first run keeps it, and later runs only add hits."""
    model = trained_mlp()
    x, y = test_batch(100)
    t = targets_for(y)
    one = hits(model, cls(model, restarts=1, seed=0, **kw)(x, y, target=t), t)
    three = hits(model, cls(model, restarts=3, seed=0, **kw)(x, y, target=t), t)
    assert one.any() and not one.all()
    assert (three | ~one).all(), "a target hit of the first run was lost"
    assert three.sum() >= one.sum()


def test_targeted_apgd_reaches_targets_with_both_losses():
    model = trained_mlp()
    x, y = test_batch(100)
    t = targets_for(y)
    for loss in ("ce", "dlr"):
        x_tgt = APGD(model, eps=0.2, steps=20, loss=loss, seed=0)(x, y, target=t)
        assert_in_threat_model(x_tgt, x, 0.2, "linf", loss)
        assert hits(model, x_tgt, t).float().mean() > 0.6, loss


def test_apgd_t_targets_the_runner_ups_of_robust_points():
    """APGD-T attacks only correctly classified points, in the threat model, and never leaves a point
    it fooled for a correctly classified one (it keeps the worst case for the model)."""
    model = trained_mlp()
    x, y = test_batch(100)
    clean_wrong = model(x).argmax(1) != y
    x_adv = APGDT(model, eps=0.08, steps=10, n_target_classes=3, seed=0)(x, y)
    assert_in_threat_model(x_adv, x, 0.08, "linf", "apgd-t")
    assert torch.equal(x_adv[clean_wrong], x[clean_wrong])
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.2
    assert ATTACKS["apgd-t"] is APGDT and APGDT(model).n_target_classes == 9 and APGDT(model).steps == 100
