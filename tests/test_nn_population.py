"""fastdiv.nn.Population (CLM/ULM random dispatch), counter_link_masks and prse (CLM eq. 4-5)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdiv
from fastdiv.nn import Population, counter_link_masks, frozen_sample, prse, sample_models, sampling


def mlp(inp: int = 16, hidden: int = 6) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()


@pytest.fixture
def pop():
    torch.manual_seed(0)
    return Population([mlp() for _ in range(4)], seed=7)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    return x, y


def dispatched(pop, x, assign):
    """Row b answered by member assign[b]: the reference output."""
    return torch.stack([pop.members[int(j)](x[b:b + 1])[0] for b, j in enumerate(assign)])


def test_each_example_answered_by_its_dispatched_member(pop, data):
    x, _ = data
    out = pop(x)
    assign = pop.last_dispatch
    assert assign.shape == (6,) and assign.dtype == torch.long
    torch.testing.assert_close(out, dispatched(pop, x, assign))


def test_dispatch_reproducible_per_seed(pop, data):
    x, _ = data
    twin = copy.deepcopy(pop)
    other = Population(list(copy.deepcopy(pop.members)), seed=8)
    seqs = {id(p): [] for p in (pop, twin, other)}
    for _ in range(3):
        for p in (pop, twin, other):
            p(x)
            seqs[id(p)].append(p.last_dispatch.clone())
    for a, b in zip(seqs[id(pop)], seqs[id(twin)]):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(seqs[id(pop)], seqs[id(other)]))
    assert not torch.equal(seqs[id(pop)][0], seqs[id(pop)][1])  # a fresh draw per call
    # seed=None: the global RNG
    free = Population(list(pop.members))
    torch.manual_seed(3)
    free(x)
    a = free.last_dispatch.clone()
    torch.manual_seed(3)
    free(x)
    assert torch.equal(a, free.last_dispatch)


def test_dispatch_roughly_uniform():
    torch.manual_seed(0)
    pop = Population([nn.Linear(2, 3) for _ in range(4)], seed=0)
    with torch.no_grad():
        pop(torch.zeros(4000, 2))
    counts = torch.bincount(pop.last_dispatch, minlength=4)
    sd = (4000 * 0.25 * 0.75) ** 0.5
    assert ((counts - 1000).abs() < 5 * sd).all(), counts


@pytest.mark.parametrize("n", [1, 4])
def test_sample_batched_equals_loop(pop, data, n):
    x, y = data
    gb, zb = fastdiv.sample_input_grads(pop, x, y, n, strategy="batched", generator=5)
    gl, zl = fastdiv.sample_input_grads(pop, x, y, n, strategy="loop", generator=5)
    torch.testing.assert_close(gb, gl)
    torch.testing.assert_close(zb, zl)
    # the loop's samples are exactly the dispatched members
    seed = 5
    for s in range(n):
        with sampling(pop, n, seed, index=s):
            z = pop(x)
        torch.testing.assert_close(zl[s], dispatched(pop, x, pop.last_dispatch).detach())
        torch.testing.assert_close(z.detach(), zl[s])
    assert supports_batched_model(pop)


def supports_batched_model(model):
    return fastdiv.nn.supports_batched(model)


def test_gradient_flows_only_through_dispatched_member(pop, data):
    x, y = data
    with sampling(pop, 1, seed=2, index=0):
        out = pop(x)
    used = set(pop.last_dispatch.tolist())
    F.cross_entropy(out, y).backward()
    for j, m in enumerate(pop.members):
        has = m[1].weight.grad is not None and m[1].weight.grad.abs().sum() > 0
        assert has == (j in used)


def test_frozen_sample_pins_one_member(pop, data):
    x, _ = data
    outs = torch.stack([m(x) for m in pop.members])
    seen = set()
    for _ in sample_models(pop, 10, seed=1):
        z = pop(x)
        j = int(pop.last_dispatch[0])
        assert (pop.last_dispatch == j).all()
        torch.testing.assert_close(z, outs[j])
        pop(x[:2])
        assert int(pop.last_dispatch[0]) == j
        seen.add(j)
    assert len(seen) > 1
    with frozen_sample(pop, seed=4), sampling(pop, 3, seed=0):
        pop(x.repeat(3, 1, 1, 1))
        assert pop.last_dispatch.unique().numel() == 1


def test_train_mode_batchnorm_disables_sample_batching():
    def bn_net():
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    pop = Population([bn_net(), bn_net()])
    assert pop.supports_sample_batching is False and not fastdiv.nn.supports_batched(pop)
    pop.eval()
    assert pop.supports_sample_batching is True


def test_counter_link_masks_fraction_shared_and_saved(pop):
    mask = counter_link_masks(pop, fraction=0.5, generator=0)
    assert mask.shape == pop.members[0][1].weight.shape == (6, 16) and mask.dtype == torch.bool
    assert pop.link_param == "1.weight"
    assert abs(mask.float().mean().item() - 0.5) < 0.12  # 96 weights
    assert bool(pop.link_mask_set)
    keys = [k for k in pop.state_dict() if "link_mask" in k]
    assert keys == ["link_mask", "link_mask_set"]  # one mask for the whole population
    assert torch.equal(counter_link_masks(pop, 0.5, generator=0), mask.clone())  # reproducible
    g = torch.Generator().manual_seed(0)
    assert torch.equal(counter_link_masks(pop, 0.5, generator=g), mask)
    assert not counter_link_masks(pop, 0.0, generator=1).any()
    assert counter_link_masks(pop, 1.0, generator=1).all()
    torch.manual_seed(0)
    big = Population([nn.Linear(100, 50) for _ in range(2)])
    m2 = counter_link_masks(big, fraction=0.3, generator=3)
    assert abs(m2.float().mean().item() - 0.3) < 0.03  # 5000 weights: sd 0.0065


@pytest.mark.parametrize("i, j, sign", [(0, 1, -1.0), (1, 0, 1.0), (2, 3, -1.0), (3, 2, 1.0)])
def test_prse_changes_exactly_masked_weights_within_delta(pop, i, j, sign):
    """β = 1[|W_i − W_j| < δ]; W_i += (−1)^n α β ⊙ ℓ with n = i + 1 (the paper's 1-based index):
    members[0], [2] (m_1, m_3: odd) move by −α, members[1], [3] by +α."""
    alpha, delta = 0.25, 0.1
    counter_link_masks(pop, 0.5, generator=1)
    w_i, w_j = pop.linked_weight(i), pop.linked_weight(j)
    g = torch.Generator().manual_seed(2)
    diffs = torch.tensor([0.0, 0.05, -0.05, 0.099, -0.099, 0.101, -0.101, 0.5, -0.5, 2.0])
    with torch.no_grad():
        w_j.copy_(torch.randn(w_j.shape, generator=g, dtype=torch.float64))
        d = diffs[torch.randint(0, len(diffs), w_i.shape, generator=g)].double()
        w_i.copy_(w_j + d)
    before = {k: v.clone() for k, v in pop.state_dict().items() if k != "_extra_state"}
    expected_changed = (d.abs() < delta) & pop.link_mask
    assert expected_changed.any() and (~expected_changed & pop.link_mask).any()
    changed = prse(pop, i, j, alpha, delta)
    assert torch.equal(changed, expected_changed)
    after = pop.state_dict()
    key = f"members.{i}.1.weight"
    torch.testing.assert_close(after[key], before[key] + sign * alpha * expected_changed.double(), rtol=0, atol=1e-15)
    untouched = before[key][~expected_changed]
    assert torch.equal(after[key][~expected_changed], untouched)
    for k, v in before.items():
        if k != key:
            assert torch.equal(after[k], v), k


def test_population_size_and_bad_input(pop):
    with pytest.raises(ValueError, match="at least 2"):
        Population([mlp()])
    with pytest.raises(ValueError, match="dispatch"):
        Population([mlp(), mlp()], dispatch="mean")
    with pytest.raises(TypeError, match="seed"):
        Population([mlp(), mlp()], seed=1.5)
    with pytest.raises(ValueError, match="link_param"):
        Population([mlp(), mlp()], link_param="nope")
    with pytest.raises(RuntimeError, match="counter_link_masks first"):
        prse(pop, 0, 1, 0.1, 0.1)
    counter_link_masks(pop, generator=0)
    with pytest.raises(ValueError, match="different"):
        prse(pop, 1, 1, 0.1, 0.1)
    with pytest.raises(ValueError, match="j must be"):
        prse(pop, 0, 4, 0.1, 0.1)
    with pytest.raises(ValueError, match="i must be"):
        prse(pop, -1, 0, 0.1, 0.1)
    with pytest.raises(ValueError, match="delta"):
        prse(pop, 0, 1, 0.1, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        prse(pop, 0, 1, -0.1, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        prse(pop, 0, 1, float("nan"), 0.1)
    with pytest.raises(ValueError, match="fraction"):
        counter_link_masks(pop, 1.5)
    with pytest.raises(TypeError, match="generator"):
        counter_link_masks(pop, 0.5, generator="x")
    with pytest.raises(TypeError, match="Population"):
        prse(nn.Linear(2, 2), 0, 1, 0.1, 0.1)
    mixed = Population([mlp(hidden=6), mlp(hidden=5)])
    with pytest.raises(ValueError, match="one architecture"):
        counter_link_masks(mixed)
    with sampling(pop, 4, seed=0), pytest.raises(ValueError, match="replicas"):
        pop(torch.zeros(6, 1, 4, 4, dtype=torch.float64))


def test_state_dict_round_trip(pop, data):
    x, _ = data
    counter_link_masks(pop, 0.5, generator=3)
    pop(x)
    pop(x)
    state = copy.deepcopy(pop.state_dict())
    torch.manual_seed(99)
    fresh = Population([mlp() for _ in range(4)])  # other weights, no seed, no mask
    fresh.load_state_dict(state)
    assert torch.equal(fresh.link_mask, pop.link_mask) and bool(fresh.link_mask_set)
    torch.testing.assert_close(fresh(x), pop(x))  # the third call of the same dispatch sequence
    assert torch.equal(fresh.last_dispatch, pop.last_dispatch)
    a = fastdiv.sample_input_grads(pop, x, torch.zeros(6, dtype=torch.long), 3, generator=1)
    b = fastdiv.sample_input_grads(fresh, x, torch.zeros(6, dtype=torch.long), 3, generator=1)
    torch.testing.assert_close(a, b)
    prse(fresh, 0, 1, 0.1, 10.0)
    prse(pop, 0, 1, 0.1, 10.0)
    torch.testing.assert_close(fresh.linked_weight(0), pop.linked_weight(0))


def test_empty_batch(pop):
    out = pop(torch.zeros(0, 1, 4, 4, dtype=torch.float64))
    assert out.shape == (0, 3)
