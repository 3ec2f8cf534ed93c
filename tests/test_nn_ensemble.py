"""fastdiv.nn.Ensemble and fastdiv.nn.predict: averaged-softmax output, members as sample models
(vmapped batched == loop == per-member reference, incl. double backward), mixed architectures,
BatchNorm, frozen samples, state dicts, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdiv
from fastdiv._seeds import mix_seed
from fastdiv.nn import Ensemble, Population, frozen_sample, predict, sample_models, sampling, supports_batched


def mlp(hidden: int = 6, act=nn.Tanh) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), act(), nn.Linear(hidden, 3)).double()


def conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.LeakyReLU(0.1), nn.Flatten(),
                         nn.Linear(48, 3)).double()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    return x, y


@pytest.fixture
def ens():
    torch.manual_seed(1)
    return Ensemble([mlp() for _ in range(3)])


def manual(members, x, y, n, create_graph=False):
    """Sample s = member s % m, one forward/backward each: the reference."""
    gs, zs = [], []
    for s in range(n):
        leaf = x.clone().requires_grad_(True)
        z = members[s % len(members)](leaf)
        (g,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), leaf, create_graph=create_graph)
        gs.append(g)
        zs.append(z)
    return torch.stack(gs), torch.stack(zs)


def test_forward_is_log_of_clamped_mean_softmax(ens, data):
    x, _ = data
    probs = torch.stack([m(x).softmax(-1) for m in ens.members]).mean(0)
    torch.testing.assert_close(ens(x), probs.clamp(min=1e-12).log())
    torch.testing.assert_close(ens.member_logits(x), torch.stack([m(x) for m in ens.members]))
    assert isinstance(ens.members, nn.ModuleList) and len(ens) == 3 and ens.homogeneous


class Const(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float64))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_clamp_before_log():
    ens = Ensemble([Const([0.0, -200.0, 0.0]), Const([1.0, -300.0, 0.0])])
    out = ens(torch.zeros(2, 1))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 1], torch.full((2,), torch.tensor(1e-12).log().item(), dtype=torch.float64))
    e = torch.e  # member 0: [1/2, 0, 1/2]; member 1: [e, 0, 1] / (1 + e)
    expected = torch.tensor([[0.25 + 0.5 * e / (1 + e), 1.0, 0.25 + 0.5 / (1 + e)]]).log()
    torch.testing.assert_close(out[:1, [0, 2]], expected[:, [0, 2]].double())


@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_batched_equals_loop_equals_members(ens, data, n):
    x, y = data
    gb, zb = fastdiv.sample_input_grads(ens, x, y, n, strategy="batched", generator=3)
    gl, zl = fastdiv.sample_input_grads(ens, x, y, n, strategy="loop", generator=4)
    gm, zm = manual(list(ens.members), x, y, n)
    torch.testing.assert_close(gb, gm)
    torch.testing.assert_close(gl, gm)
    torch.testing.assert_close(zb, zm.detach())
    torch.testing.assert_close(zl, zm.detach())


@pytest.mark.parametrize("strategy", ["batched", "loop"])
def test_create_graph_double_backward_reaches_members(ens, data, strategy):
    x, y = data
    n = 4  # member 0 serves samples 0 and 3
    ref = copy.deepcopy(ens)
    grads, logits = fastdiv.sample_input_grads(ens, x, y, n, strategy=strategy, create_graph=True, generator=0)
    loss = grads.pow(2).sum() + F.cross_entropy(logits.flatten(0, 1), y.repeat(n))
    loss.backward()
    gm, zm = manual(list(ref.members), x, y, n, create_graph=True)
    (gm.pow(2).sum() + F.cross_entropy(zm.flatten(0, 1), y.repeat(n))).backward()
    for (name, p), q in zip(ens.named_parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_mixed_architectures_fall_back_to_loop(data):
    x, y = data
    torch.manual_seed(2)
    members = [mlp(6), mlp(4), mlp(6, act=nn.ReLU)]
    ens = Ensemble(members)
    assert not ens.homogeneous and ens.supports_sample_batching is False
    assert not supports_batched(ens) and supports_batched(Ensemble([mlp(), mlp()]))
    grads, logits = fastdiv.sample_input_grads(ens, x, y, 3, generator=0)  # auto -> loop
    gm, zm = manual(members, x, y, 3)
    torch.testing.assert_close(grads, gm)
    torch.testing.assert_close(logits, zm.detach())
    with pytest.raises(ValueError, match="loop"):
        fastdiv.sample_input_grads(ens, x, y, 3, strategy="batched")
    with sampling(ens, 3, seed=0):  # a direct sample-batched forward still works, sample by sample
        out = ens(x.repeat(3, 1, 1, 1))
    torch.testing.assert_close(out, zm.detach().flatten(0, 1))
    probs = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
    torch.testing.assert_close(ens(x), probs.log())


@pytest.mark.parametrize("n", [3, 2, 5])  # vmapped (each member once) and the sequential fallback (k > m)
def test_batchnorm_train_mode_batched_equals_loop(data, n):
    x, y = data
    torch.manual_seed(5)
    ens = Ensemble([conv_bn() for _ in range(3)]).train()
    twin = copy.deepcopy(ens)
    gb, zb = fastdiv.sample_input_grads(ens, x, y, n, strategy="batched", generator=0)
    gl, zl = fastdiv.sample_input_grads(twin, x, y, n, strategy="loop", generator=0)
    torch.testing.assert_close(gb, gl)
    torch.testing.assert_close(zb, zl)
    for (name, a), b in zip(ens.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, msg=name)
    assert int(ens.members[0][1].num_batches_tracked) == len(range(0, n, 3))


def test_batchnorm_train_mode_outside_sampling_updates_each_member(data):
    x, _ = data
    torch.manual_seed(6)
    ens = Ensemble([conv_bn() for _ in range(2)]).train()
    twin = copy.deepcopy(ens)
    out = ens(x)
    ref = torch.stack([m(x).softmax(-1) for m in twin.members]).mean(0).log()
    torch.testing.assert_close(out, ref)
    for a, b in zip(ens.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)


def test_batchnorm_eval_mode_vmapped(data):
    x, y = data
    torch.manual_seed(7)
    ens = Ensemble([conv_bn() for _ in range(3)])
    for m in ens.members:  # distinct running statistics
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2)
    ens.eval()
    gb, zb = fastdiv.sample_input_grads(ens, x, y, 3, strategy="batched", generator=0)
    gm, zm = manual(list(ens.members), x, y, 3)
    torch.testing.assert_close(gb, gm)
    torch.testing.assert_close(zb, zm.detach())


def test_frozen_sample_pins_one_member(ens, data):
    x, _ = data
    outs = torch.stack([m(x) for m in ens.members])
    seen = set()
    for _ in sample_models(ens, 12, seed=0):
        z = ens(x)
        j = int((outs - z).abs().flatten(1).amax(1).argmin())
        torch.testing.assert_close(z, outs[j])
        torch.testing.assert_close(ens(x[:2]), outs[j, :2])  # any batch size: the same member
        with sampling(ens, 4, seed=9):  # nested sampling: every sample is the pinned member
            torch.testing.assert_close(ens(x.repeat(4, 1, 1, 1)), outs[j].repeat(4, 1))
        seen.add(j)
    assert len(seen) > 1
    with frozen_sample(ens, seed=3):
        a = ens(x)
    with frozen_sample(ens, seed=3):
        torch.testing.assert_close(ens(x), a)


def test_predict_ensemble_is_mean_softmax_of_members(ens, data):
    x, _ = data
    ref = torch.stack([m(x).softmax(-1) for m in ens.members]).mean(0)
    torch.testing.assert_close(predict(ens, x), ref)
    torch.testing.assert_close(predict(ens, x, num_samples=7, chunk=2), ref)  # num_samples: the members


def test_predict_deterministic_and_randomized(data):
    x, _ = data
    torch.manual_seed(8)
    net = mlp()
    torch.testing.assert_close(predict(net, x, chunk=3), net(x).softmax(-1).detach())
    pop = Population([mlp() for _ in range(3)])
    n, seed = 6, 11
    ref = 0
    for s in range(n):
        with sampling(pop, n, seed, index=s):
            ref = ref + pop(x).softmax(-1).detach()
    torch.testing.assert_close(predict(pop, x, num_samples=n, seed=seed), ref / n)
    torch.testing.assert_close(predict(pop, x, num_samples=n, seed=seed), predict(pop, x, num_samples=n, seed=seed))
    probs = predict(pop, x, num_samples=50, seed=1, chunk=2)
    assert probs.shape == (5, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(5, dtype=torch.float64))
    assert predict(pop, x[:0], num_samples=3, seed=0).shape == (0, 3)


def test_predict_torch_dropout_averages_forwards(data):
    x, _ = data
    torch.manual_seed(9)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3)).double()
    net.train()
    torch.manual_seed(0)
    probs = predict(net, x, num_samples=4, seed=5)
    # the global RNG is seeded per sample from the seed and restored: nothing drawn from it here
    assert torch.equal(torch.random.get_rng_state(), torch.manual_seed(0).get_state())
    ref = 0
    for s in range(4):
        torch.manual_seed(mix_seed(5, s))
        ref = ref + net(x).softmax(-1).detach()
    torch.testing.assert_close(probs, ref / 4)
    assert not torch.allclose(probs, predict(net, x, num_samples=4, seed=6))  # 4 real, distinct draws


def test_state_dict_round_trip(ens, data):
    x, y = data
    torch.manual_seed(123)
    fresh = Ensemble([mlp() for _ in range(3)])
    assert not torch.allclose(fresh(x), ens(x))
    fresh.load_state_dict(ens.state_dict())
    torch.testing.assert_close(fresh(x), ens(x))
    a = fastdiv.sample_input_grads(ens, x, y, 5, generator=2)
    b = fastdiv.sample_input_grads(fresh, x, y, 5, generator=2)
    torch.testing.assert_close(a, b)


def test_single_member_and_float32():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    ens = Ensemble([m])
    x = torch.randn(4, 1, 4, 4)
    torch.testing.assert_close(ens(x), m(x).log_softmax(-1), atol=1e-6, rtol=1e-5)
    g, _ = fastdiv.sample_input_grads(ens, x, torch.zeros(4, dtype=torch.long), 2, strategy="batched", generator=0)
    assert g.dtype == torch.float32 and g.shape == (2, 4, 1, 4, 4)


def test_bad_input(data):
    x, _ = data
    with pytest.raises(ValueError, match="at least 1"):
        Ensemble([])
    with pytest.raises(TypeError, match="members\\[1\\]"):
        Ensemble([mlp(), 3])
    with pytest.raises(TypeError, match="single"):
        Ensemble(mlp()[1])
    with pytest.raises(TypeError, match="iterable"):
        Ensemble(5)
    m = mlp()
    with pytest.raises(ValueError, match="twice"):
        Ensemble([m, m])
    with pytest.raises(ValueError, match="RandomizedModule"):
        Ensemble([mlp(), Population([mlp(), mlp()])])
    ens = Ensemble([mlp(), mlp()])
    with sampling(ens, 3, seed=0), pytest.raises(ValueError, match="replicas"):
        ens(x[:4])
    with pytest.raises(ValueError, match="num_samples"):
        predict(ens, x, num_samples=0)
    with pytest.raises(ValueError, match="chunk"):
        predict(ens, x, chunk=0)
    with pytest.raises(TypeError, match="floating"):
        predict(ens, x.long())
    with pytest.raises(ValueError, match="batch"):
        predict(ens, x[0, 0, 0])
    with pytest.raises(TypeError, match="nn.Module"):
        predict(lambda t: t, x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ensemble_population_priority_dropout():
    from fastdiv.nn import PriorityDropoutEnsemble, counter_link_masks, prse
    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64, device=dev)
    y = torch.tensor([0, 1, 2, 1, 0], device=dev)
    relu = lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    models = [Ensemble([conv_bn() for _ in range(3)]).train(), Population([mlp() for _ in range(3)], seed=1),
              PriorityDropoutEnsemble([relu() for _ in range(3)]).train()]
    for model in models:
        model.to(dev)
        twin = copy.deepcopy(model)
        gb, zb = fastdiv.sample_input_grads(model, x, y, 3, strategy="batched", generator=0)
        gl, zl = fastdiv.sample_input_grads(twin, x, y, 3, strategy="loop", generator=0)
        assert gb.device.type == "cuda"
        torch.testing.assert_close(gb, gl)
        torch.testing.assert_close(zb, zl)
        probs = predict(model, x, num_samples=4, seed=0)
        torch.testing.assert_close(probs.sum(1), torch.ones(5, dtype=torch.float64, device=dev))
    pop = models[1]
    counter_link_masks(pop, 0.5, generator=0)
    assert pop.link_mask.device.type == "cuda"
    assert prse(pop, 0, 1, 0.1, 10.0).sum() == pop.link_mask.sum()
