"""fastdiv.sample_input_grads: the n sample models' input gradients in one batched pass equal the
per-sample loop and plain autograd, for every loss, with BatchNorm in train mode, and double backward."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastdiv
from fastdiv.grads import per_example_loss, resolve_seed
from fastdiv.nn import RandomizedModule, frozen_sample, sampling

from conftest import Noise

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


class Stacked(RandomizedModule):
    """Sample s is member s mod K (a stacked deterministic ensemble)."""

    def __init__(self, members) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        state = self.sample_state()
        if state is None:
            return self.members[0](x)
        k = state.active
        rows = x.shape[0] // k
        first = 0 if state.index is None else state.index
        return torch.cat([self.members[(first + j) % len(self.members)](x[j * rows:(j + 1) * rows])
                          for j in range(k)])


def noise_mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), Noise(0.3), nn.Linear(12, 16), nn.Tanh(), Noise(0.2), nn.Linear(16, 5)).to(dtype)


def bn_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Noise(0.5), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 3 * 4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 5)).to(dtype).train()


def stacked(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return Stacked([nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 5))
                    for _ in range(3)]).to(dtype)


MODELS = {"noise-mlp": noise_mlp, "bn-train": bn_model, "stacked": stacked}


def data(batch=6, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 3, 4, generator=gen, dtype=dtype)
    y = torch.randint(0, 5, (batch,), generator=gen)
    return x, y


def manual_loss(loss, logits, y):
    """Hand-written per-example losses (independent of fastdiv.grads)."""
    if loss == "ce":
        return -logits.log_softmax(1)[torch.arange(len(y)), y]
    if loss == "logit":
        return logits[torch.arange(len(y)), y]
    if loss == "cw":
        true = logits[torch.arange(len(y)), y]
        other = torch.stack([torch.cat([row[:c], row[c + 1:]]).max() for row, c in zip(logits, y.tolist())])
        return torch.minimum(other - true, torch.zeros_like(true))
    return loss(logits, y)


def manual_grads(model, x, y, n, seed, loss):
    """The definition: sample model s alone (sampling(..., index=s)), plain autograd per sample."""
    grads, logits = [], []
    for s in range(n):
        leaf = x.clone().requires_grad_(True)
        with sampling(model, n, seed, index=s):
            z = model(leaf)
        (g,) = torch.autograd.grad(manual_loss(loss, z, y).sum(), leaf)
        grads.append(g)
        logits.append(z.detach())
    return torch.stack(grads), torch.stack(logits)


def squared_margin(logits, y):  # a callable loss
    return (logits - logits.gather(1, y[:, None])).pow(2).sum(1)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("loss", ["ce", "logit", "cw", squared_margin], ids=["ce", "logit", "cw", "callable"])
def test_batched_loop_and_manual_agree(model_name, loss):
    n, seed = 4, 123
    x, y = data()
    models = {s: MODELS[model_name]() for s in ("batched", "loop", "manual")}
    out = {s: fastdiv.sample_input_grads(models[s], x, y, n, loss=loss, strategy=s, generator=seed)
           for s in ("batched", "loop")}
    out["manual"] = manual_grads(models["manual"], x, y, n, seed, loss)
    for s in ("batched", "loop"):
        grads, logits = out[s]
        assert grads.shape == (n, *x.shape) and logits.shape == (n, x.shape[0], 5)
        torch.testing.assert_close(grads, out["manual"][0], rtol=1e-10, atol=1e-12, msg=f"{s} grads")
        torch.testing.assert_close(logits, out["manual"][1], rtol=1e-10, atol=1e-12, msg=f"{s} logits")
    # the samples really differ (not n copies of one model)
    assert (out["batched"][0][0] - out["batched"][0][1]).abs().max() > 1e-6
    # BatchNorm running statistics: the batched pass updates them as the n sequential forwards did
    for (name, a), (_, b) in zip(models["batched"].named_buffers(), models["manual"].named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_per_example_loss_matches_manual():
    logits = torch.randn(7, 5, dtype=torch.float64)
    y = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    for loss in ("ce", "logit", "cw", squared_margin):
        torch.testing.assert_close(per_example_loss(loss, logits, y), manual_loss(loss, logits, y))


def test_image_shapes_float32_and_auto():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Noise(0.1), nn.Flatten(), nn.LazyLinear(10))
    x = torch.rand(5, 3, 6, 7)
    y = torch.randint(0, 10, (5,))
    model(x)  # materialize the lazy layer
    grads, logits = fastdiv.sample_input_grads(model, x, y, 3, generator=0)
    assert grads.shape == (3, 5, 3, 6, 7) and logits.shape == (3, 5, 10)
    assert grads.dtype == torch.float32 and not logits.requires_grad
    loop, _ = fastdiv.sample_input_grads(model, x, y, 3, generator=0, strategy="loop")
    torch.testing.assert_close(grads, loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["batched", "loop"])
def test_create_graph_gradcheck(strategy):
    """Double backward: the input gradients are differentiable in the model's weights (training a
    penalty on them); the input itself is detached (documented)."""
    torch.manual_seed(0)
    lin1 = nn.Linear(3, 4).double()
    noise = Noise(0.3)
    x, y = torch.rand(2, 4, dtype=torch.float64), torch.tensor([0, 2])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.noise = noise
            self.w = None

        def forward(self, inp):
            return torch.tanh(self.noise(inp) @ self.w.T) @ lin1.weight.T

    net = Net()

    def fn(w):
        net.w = w
        grads, logits = fastdiv.sample_input_grads(net, x, y, 3, create_graph=True, strategy=strategy,
                                                   generator=5)
        return grads, logits

    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (w,))
    # the double-backward path a training step takes: a penalty on the gradients, backward to w
    grads, _ = fn(w)
    (dw,) = torch.autograd.grad(grads.pow(2).sum(), w)
    assert dw.abs().sum() > 0
    # without create_graph the results carry no graph
    net.w = w
    grads, logits = fastdiv.sample_input_grads(net, x, y, 3, strategy=strategy, generator=5)
    assert not grads.requires_grad and not logits.requires_grad


def test_deterministic_model_is_expanded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    x, y = data()
    grads, logits = fastdiv.sample_input_grads(model, x, y, 4)
    leaf = x.clone().requires_grad_(True)
    z = model(leaf)
    (g,) = torch.autograd.grad(manual_loss("ce", z, y).sum(), leaf)
    assert grads.shape == (4, *x.shape)
    for s in range(4):
        torch.testing.assert_close(grads[s], g)
        torch.testing.assert_close(logits[s], z.detach())


def test_seeds_and_generators():
    model = noise_mlp()
    x, y = data()
    a, _ = fastdiv.sample_input_grads(model, x, y, 3, generator=7)
    b, _ = fastdiv.sample_input_grads(model, x, y, 3, generator=7)
    c, _ = fastdiv.sample_input_grads(model, x, y, 3, generator=8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-6
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(fastdiv.sample_input_grads(model, x, y, 3, generator=g1)[0],
                               fastdiv.sample_input_grads(model, x, y, 3, generator=g2)[0], rtol=0, atol=0)
    assert resolve_seed(11) == 11
    # the global RNG when no generator is given: reproducible under torch.manual_seed
    torch.manual_seed(1)
    d, _ = fastdiv.sample_input_grads(model, x, y, 3)
    torch.manual_seed(1)
    e, _ = fastdiv.sample_input_grads(model, x, y, 3)
    torch.testing.assert_close(d, e, rtol=0, atol=0)


def test_frozen_sample_pins_every_sample():
    model = noise_mlp()
    x, y = data()
    with frozen_sample(model, seed=4):
        grads, _logits = fastdiv.sample_input_grads(model, x, y, 3, generator=0)
    for s in (1, 2):
        torch.testing.assert_close(grads[s], grads[0], rtol=1e-12, atol=1e-14)


def test_torch_dropout_uses_the_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Dropout(0.5), nn.Linear(16, 5)).double().train()
    x, y = data()
    grads, _ = fastdiv.sample_input_grads(model, x, y, 3, generator=0)
    assert grads.shape == (3, *x.shape) and (grads[0] - grads[1]).abs().max() > 0
    with pytest.raises(ValueError, match="strategy='loop'"):
        fastdiv.sample_input_grads(model, x, y, 3, strategy="batched")
    model.eval()  # dropout off: deterministic
    grads, _ = fastdiv.sample_input_grads(model, x, y, 3, strategy="loop")
    torch.testing.assert_close(grads[0], grads[2], rtol=0, atol=0)


def test_empty_batch():
    model = noise_mlp()
    x, y = data()
    grads, logits = fastdiv.sample_input_grads(model, x[:0], y[:0], 3, generator=0)
    assert grads.shape == (3, 0, 1, 3, 4) and logits.shape == (3, 0, 5)


class ThreeD(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :5].unsqueeze(1)


@pytest.mark.parametrize("case, error, match", [
    ({"model": "not a model"}, TypeError, "model must be an nn.Module"),
    ({"x": torch.zeros(6, 1, 3, 4, dtype=torch.int64)}, TypeError, "x must be a floating-point"),
    ({"x": torch.zeros(6, dtype=torch.float64)}, ValueError, "x must be a batch"),
    ({"y": torch.zeros(6)}, TypeError, "y must be an integer tensor"),
    ({"y": torch.zeros(5, dtype=torch.long)}, ValueError, "y must have shape"),
    ({"y": torch.full((6,), 5)}, ValueError, r"labels y must be in \[0, 5\)"),
    ({"y": torch.full((6,), -1)}, ValueError, r"labels y must be in \[0, 5\)"),
    ({"n": 0}, ValueError, "num_samples must be an int >= 1"),
    ({"n": True}, ValueError, "num_samples must be an int >= 1"),
    ({"strategy": "vmap"}, ValueError, "strategy must be one of"),
    ({"create_graph": 1}, TypeError, "create_graph must be a bool"),
    ({"loss": "hinge"}, ValueError, "loss must be one of"),
    ({"loss": lambda z, y: z.sum()}, ValueError, "callable loss must return a per-example tensor"),
    ({"generator": 1.5}, TypeError, "generator must be"),
    ({"model": ThreeD()}, ValueError, r"must return logits \[N, C\]"),
])
def test_bad_inputs(case, error, match):
    x, y = data()
    args = {"model": noise_mlp(), "x": x, "y": y, "n": 3, "loss": "ce", "strategy": "auto", "create_graph": False,
            "generator": 0}
    args.update(case)
    with pytest.raises(error, match=match):
        fastdiv.sample_input_grads(args["model"], args["x"], args["y"], args["n"], loss=args["loss"],
                                   strategy=args["strategy"], create_graph=args["create_graph"],
                                   generator=args["generator"])


def test_inputs_not_modified_and_model_unchanged():
    model = noise_mlp()
    before = copy.deepcopy(model.state_dict())
    x, y = data()
    x_copy, y_copy = x.clone(), y.clone()
    fastdiv.sample_input_grads(model, x, y, 3, generator=0)
    assert torch.equal(x, x_copy) and torch.equal(y, y_copy)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_sample_logits_of_several_inputs_equals_one_call_each(strategy):
    """Several inputs on the same sample models: what one sample_logits call per input gives."""
    from fastdiv.grads import sample_logits, sample_logits_of

    model = noise_mlp()
    xa, _ = data(seed=1)
    xb, _ = data(seed=2)
    both = sample_logits_of(model, (xa, xb), 4, seed=5, strategy=strategy)
    for got, x in zip(both, (xa, xb)):
        torch.testing.assert_close(got, sample_logits(model, x, 4, seed=5, strategy=strategy), rtol=0, atol=0)


def test_sample_logits_of_a_global_rng_model_reseeds_per_input():
    """A model drawing from the global RNG sees the same draws for each input, as separate calls do."""
    from fastdiv.grads import sample_logits, sample_logits_of

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    x = torch.randn(5, 4, dtype=torch.float64)
    a, b = sample_logits_of(model, (x, x.clone()), 3, seed=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, sample_logits(model, x, 3, seed=2), rtol=0, atol=0)
