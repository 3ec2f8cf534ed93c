"""fastdiv.nn.PriorityDropout (LPD eq. 3-6 / Algorithm 1, PDD eq. 2) and PriorityDropoutEnsemble."""
from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from torch import nn

import fastdiv
from fastdiv.nn import Ensemble, PriorityDropout, PriorityDropoutEnsemble, sampling

A, LAM, B_, G = 0.85, 0.5, 0.127, 1.0  # the paper's α, λ, β (γ unstated: 1)


def reference_keep(features, kind="lpd", s=0.1, lam=LAM, alpha=A, beta=B_, gamma=G, eps=0.0):
    """Algorithm 1 with Python loops and Counters, from the paper's text."""
    k = features.shape[0]
    rows = features.reshape(k, -1).tolist()
    bins = [[math.ceil(v / s) if v > eps else None for v in row] for row in rows]
    n = [Counter(b for b in row if b is not None) for row in bins]
    total = Counter()
    for c in n:
        total.update(c)
    ranked = sorted(total, key=lambda b: (-total[b], b))
    r = [ranked[i % len(ranked)] for i in range(k)] if ranked else [0] * k
    c = [sum(ci.values()) for ci in n]
    out = []
    for i in range(k):
        row = []
        for b in bins[i]:
            if b is None:
                row.append(1.0)
            elif kind == "lpd":
                z = gamma * n[i][b] / c[i] * ((r[i] - b) * s) ** 2
                row.append(alpha / (2 * lam) * math.exp(-z / lam) + beta)
            else:
                row.append(alpha if b == r[i] else beta * (1 - n[i][b] / c[i]))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64).reshape(features.shape)


# member 0: intervals 1, 1, 3 and one inactive unit; member 1: 1, 3, 3, 4 (s = 0.1)
HAND = torch.tensor([[[0.05, 0.07], [0.25, 0.0]], [[0.04, 0.26], [0.27, 0.31]]], dtype=torch.float64)


def test_lpd_keep_rates_hand_computed():
    """n_0 = {1: 2, 3: 1}, C_0 = 3; n_1 = {1: 1, 3: 2, 4: 1}, C_1 = 4; N = {1: 3, 3: 3, 4: 1}: the tie
    goes to the smaller median, so r_0 = 0.05 (interval 1) and r_1 = 0.25 (interval 3)."""
    pd = PriorityDropout("lpd", num_members=2)
    p = pd.keep_probabilities(HAND)
    e = math.exp
    expected = torch.tensor([
        [[A + B_, A + B_], [A * e(-(1 / 3) * 0.2 ** 2 / LAM) + B_, 1.0]],
        [[A * e(-(1 / 4) * 0.2 ** 2 / LAM) + B_, A + B_], [A + B_, A * e(-(1 / 4) * 0.1 ** 2 / LAM) + B_]],
    ], dtype=torch.float64)  # α/(2λ) = α for λ = 0.5
    torch.testing.assert_close(p, expected)
    torch.testing.assert_close(p, reference_keep(HAND))
    pd.train()
    pd(HAND)
    torch.testing.assert_close(pd.priority, torch.tensor([0.05, 0.25]))
    torch.testing.assert_close(pd.keep_rate,
                               torch.stack([expected[0].flatten()[:3].mean(), expected[1].mean()]).float())


def test_pdd_keep_rates_hand_computed():
    pd = PriorityDropout("pdd", num_members=2)
    p = pd.keep_probabilities(HAND)
    expected = torch.tensor([
        [[A, A], [B_ * (1 - 1 / 3), 1.0]],
        [[B_ * (1 - 1 / 4), A], [A, B_ * (1 - 1 / 4)]],
    ], dtype=torch.float64)
    torch.testing.assert_close(p, expected)
    torch.testing.assert_close(p, reference_keep(HAND, "pdd"))


@pytest.mark.parametrize("kind", ["lpd", "pdd"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_keep_rates_match_reference_on_random_activations(kind, k):
    g = torch.Generator().manual_seed(k)
    # ReLU-like activations on a grid of interval centres (no bin-boundary rounding ambiguity)
    feats = (torch.randint(0, 12, (k, 4, 7), generator=g).double() * 0.1 - 0.05).clamp(min=0)
    feats[feats > 0] += torch.empty_like(feats[feats > 0]).uniform_(-0.03, 0.03, generator=g)
    pd = PriorityDropout(kind, num_members=k, gamma=3.0, lam=0.6, alpha=0.9, beta=0.1)
    torch.testing.assert_close(pd.keep_probabilities(feats),
                               reference_keep(feats, kind, gamma=3.0, lam=0.6, alpha=0.9, beta=0.1))


def test_fewer_intervals_than_members_and_nothing_active():
    feats = torch.full((3, 2, 4), 0.05, dtype=torch.float64)  # one interval for three members
    pd = PriorityDropout("lpd", num_members=3)
    torch.testing.assert_close(pd.keep_probabilities(feats), torch.full_like(feats, A + B_))
    dead = torch.zeros(3, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(pd.keep_probabilities(dead), torch.ones_like(dead))
    pd.train()
    assert torch.equal(pd(dead), dead)
    assert pd.priority.isnan().all()


def test_far_from_priority_keep_rate_is_beta_and_masks_follow_it():
    """Members with half their units at 0.05 and half at 5.05: r_0 = 0.05, r_1 = 5.05; the units
    of the other interval are 5 away (z = 0.5 · 25), so their keep rate is β, and the empirical
    keep frequency of the masks matches."""
    torch.manual_seed(0)
    f = 2000
    feats = torch.cat([torch.full((2, 1, f), 0.05), torch.full((2, 1, f), 5.05)], dim=2)
    pd = PriorityDropout("lpd", num_members=2).train()
    p = pd.keep_probabilities(feats)
    far = torch.stack([feats[0] > 1, feats[1] < 1])
    assert abs(p[far].mean().item() - B_) < 1e-6
    torch.testing.assert_close(p[~far], torch.full_like(p[~far], A + B_))
    kept = torch.stack([(pd(feats) != 0).float() for _ in range(10)]).mean(0)
    sd = (B_ * (1 - B_) / (10 * far.sum().item())) ** 0.5
    assert abs(kept[far].mean().item() - B_) < 6 * sd
    assert abs(kept[~far].mean().item() - (A + B_)) < 0.02


def test_masks_zero_units_and_eval_is_identity():
    torch.manual_seed(1)
    feats = torch.rand(3, 8, 16, dtype=torch.float64)
    pd = PriorityDropout("lpd", num_members=3)
    pd.eval()
    assert torch.equal(pd(feats), feats)
    pd.train()
    out = pd(feats)
    kept = out != 0
    assert torch.equal(out[kept], feats[kept]) and (~kept).any()  # no rescaling by default
    scaled = PriorityDropout("pdd", num_members=3, rescale=True).train()
    with sampling(scaled, 1, seed=4, index=0):
        out = scaled(feats)
        p = scaled.keep_probabilities(feats)
        noise = scaled.draw((3, 8, 16), like=feats, kind="uniform")[0]
    keep = noise < p
    torch.testing.assert_close(out, torch.where(keep, feats / p, 0))


def test_sample_groups_have_their_own_statistics():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 3, 5, generator=g, dtype=torch.float64)
    b = torch.rand(2, 3, 5, generator=g, dtype=torch.float64) * 2
    pd = PriorityDropout("lpd", num_members=2, gamma=5.0)
    with sampling(pd, 2, seed=0):
        p = pd.keep_probabilities(torch.cat([a, b], dim=1))
    torch.testing.assert_close(p, torch.cat([reference_keep(a, gamma=5.0), reference_keep(b, gamma=5.0)], dim=1))


def relu_mlp(hidden=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 3)).double()


@pytest.fixture
def pde():
    torch.manual_seed(0)
    return PriorityDropoutEnsemble([relu_mlp() for _ in range(3)], kind="lpd", gamma=20.0).train()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(2)
    return torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])


def test_ensemble_wiring_matches_manual(pde, data):
    x, _ = data
    assert pde.head_names == ["3", "3", "3"]
    with sampling(pde, 1, seed=5, index=0):
        logits = pde.member_logits(x)
        feats = torch.stack([m[:3](x) for m in pde.members])
        p = pde.dropout.keep_probabilities(feats)
        noise = pde.dropout.draw((3, 6, 8), like=feats, kind="uniform")[0]
    dropped = feats * (noise < p)
    expected = torch.stack([m[3](dropped[i]) for i, m in enumerate(pde.members)])
    torch.testing.assert_close(logits, expected)
    assert (dropped == 0).sum() > (feats == 0).sum()  # something was dropped
    torch.testing.assert_close(pde(x).exp().sum(1), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 4])
def test_train_mode_batched_equals_loop(pde, data, n):
    x, y = data
    gb, zb = fastdiv.sample_input_grads(pde, x, y, n, strategy="batched", generator=7)
    gl, zl = fastdiv.sample_input_grads(pde, x, y, n, strategy="loop", generator=7)
    torch.testing.assert_close(gb, gl)
    torch.testing.assert_close(zb, zl)
    g2, _ = fastdiv.sample_input_grads(pde, x, y, n, strategy="batched", generator=8)
    assert not torch.allclose(gb, g2)  # the masks are random


def test_eval_mode_is_the_plain_ensemble(pde, data):
    x, y = data
    pde.eval()
    plain = Ensemble(copy.deepcopy(list(pde.members)))
    torch.testing.assert_close(pde(x), plain(x))
    torch.testing.assert_close(pde.member_logits(x), plain.member_logits(x))
    a = fastdiv.sample_input_grads(pde, x, y, 3, generator=1)
    b = fastdiv.sample_input_grads(plain, x, y, 3, generator=1)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(fastdiv.nn.predict(pde, x), fastdiv.nn.predict(plain, x))


def test_build_model_members_and_state_dict_round_trip():
    torch.manual_seed(3)
    members = [fastdiv.nn.build_model("lenet5", in_shape=(1, 8, 8), num_classes=4) for _ in range(2)]
    ens = PriorityDropoutEnsemble(members, kind="pdd").train()
    x = torch.rand(3, 1, 8, 8)
    with sampling(ens, 2, seed=1):
        out = ens(x.repeat(2, 1, 1, 1))
    assert out.shape == (6, 4)
    assert {"dropout.priority", "dropout.keep_rate"} <= set(ens.state_dict())
    torch.manual_seed(4)
    fresh = PriorityDropoutEnsemble([fastdiv.nn.build_model("lenet5", in_shape=(1, 8, 8), num_classes=4)
                                     for _ in range(2)], kind="pdd").train()
    fresh.load_state_dict(ens.state_dict())
    torch.testing.assert_close(fresh.dropout.priority, ens.dropout.priority, equal_nan=True)
    torch.testing.assert_close(fresh.dropout.keep_rate, ens.dropout.keep_rate, equal_nan=True)
    with sampling(ens, 2, seed=9):
        a = ens(x.repeat(2, 1, 1, 1))
    with sampling(fresh, 2, seed=9):
        b = fresh(x.repeat(2, 1, 1, 1))
    torch.testing.assert_close(a, b)


class Doubled(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.body(x))) * 2


def test_head_selection_and_errors():
    ens = PriorityDropoutEnsemble([Doubled(), Doubled()], head="fc").train()
    with pytest.raises(RuntimeError, match="output of its head"):
        ens.member_logits(torch.rand(2, 4))
    with pytest.raises(ValueError, match="no nn.Linear"):
        PriorityDropoutEnsemble([nn.Sequential(nn.Flatten()), nn.Sequential(nn.Flatten())])
    with pytest.raises(ValueError, match="no submodule"):
        PriorityDropoutEnsemble([Doubled(), Doubled()], head="head")
    with pytest.raises(ValueError, match="itself the head"):
        PriorityDropoutEnsemble([nn.Linear(2, 2), nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="num_members"):
        PriorityDropoutEnsemble([Doubled(), Doubled()], num_members=2)


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "mc"}, "kind"), ({"num_members": 0}, "num_members"), ({"num_members": 2.0}, "num_members"),
    ({"s": 0.0}, "s "), ({"lam": -1.0}, "lam"), ({"alpha": 1.2}, "alpha"), ({"beta": -0.1}, "beta"),
    ({"gamma": -1.0}, "gamma"), ({"lam": 0.25}, "must be <= 1"), ({"s": float("nan")}, "finite"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PriorityDropout(**kwargs)


def test_bad_features():
    pd = PriorityDropout(num_members=3)
    with pytest.raises(ValueError, match="K=3"):
        pd(torch.rand(2, 4, 5))
    with pytest.raises(ValueError, match="K=3"):
        pd(torch.rand(3, 4))
    with pytest.raises(TypeError, match="floating"):
        pd(torch.ones(3, 4, 5, dtype=torch.long))
    pd.train()
    with sampling(pd, 3, seed=0), pytest.raises(ValueError, match="replicas"):
        pd(torch.rand(3, 4, 5))
