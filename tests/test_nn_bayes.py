"""Bayesian layers and noise injection (fastdiv.nn.bayes, fastdiv.nn.noise): KL, per-sample draws in the
batched forward vs the loop, freezing, state dicts, double backward, bad input."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdiv
from fastdiv.nn import (
    BayesBatchNorm2d,
    BayesConv2d,
    BayesLinear,
    NoiseInjection,
    RandomizedModule,
    frozen_sample,
    kl_divergence,
    sample_models,
    sampling,
)
from fastdiv.nn.bayes import gaussian_kl


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Spread the means and log-sigmas so that a wrong pairing of mu/sigma or of draws cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("log_sigma"):
                p.copy_(torch.empty(p.shape).uniform_(-3.0, -0.5, generator=gen))
            elif name.endswith("_mu"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return module


def _batched_and_loop(layer: nn.Module, x: torch.Tensor, n: int, seed: int):
    """(batched output [n, B, ...], looped output [n, B, ...]) of ``layer`` on ``x`` for ``n`` samples."""
    with sampling(layer, n, seed):
        batched = layer(x.repeat(n, *([1] * (x.dim() - 1))))
    loop = []
    for i in range(n):
        with sampling(layer, n, seed, index=i):
            loop.append(layer(x))
    return batched.reshape(n, *x.shape[:1], *batched.shape[1:]), torch.stack(loop)


# --------------------------------------------------------------------------------------------------
# KL divergence
# --------------------------------------------------------------------------------------------------


def test_gaussian_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(50, generator=gen, dtype=torch.float64)
    log_sigma = torch.empty(50, dtype=torch.float64).uniform_(-4, 1, generator=gen)
    for sigma0 in (0.05, 0.1, 1.3):
        want = torch.distributions.kl_divergence(torch.distributions.Normal(mu, log_sigma.exp()),
                                                 torch.distributions.Normal(torch.zeros_like(mu), sigma0))
        torch.testing.assert_close(gaussian_kl(mu, log_sigma, sigma0), want, rtol=1e-12, atol=1e-12)


def test_kl_zero_at_the_prior():
    layer = BayesLinear(4, 3, sigma0=0.2).double()
    with torch.no_grad():
        layer.weight_mu.zero_()
        layer.bias_mu.zero_()
    # log_sigma starts at log(sigma0): posterior == prior
    assert abs(layer.kl().item()) < 1e-12


def test_kl_closed_form_vs_monte_carlo():
    layer = _randomize(BayesConv2d(2, 3, 3, sigma0=0.15), seed=3).double()
    draws = 4000
    with sampling(layer, draws, seed=11):
        w = layer.sample("weight", 0)  # [draws, 3, 2, 3, 3]
        b = layer.sample("bias", 1)
    q_w = torch.distributions.Normal(layer.weight_mu, layer.weight_log_sigma.exp())
    q_b = torch.distributions.Normal(layer.bias_mu, layer.bias_log_sigma.exp())
    prior = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 0.15)
    log_ratio = ((q_w.log_prob(w) - prior.log_prob(w)).flatten(1).sum(1)
                 + (q_b.log_prob(b) - prior.log_prob(b)).sum(1)).detach()
    mc, se = log_ratio.mean().item(), log_ratio.std().item() / math.sqrt(draws)
    exact = layer.kl().item()
    assert abs(mc - exact) < 4 * se + 1e-3 * abs(exact), (mc, se, exact)


def test_model_kl_is_the_sum_of_layer_closed_forms():
    torch.manual_seed(0)
    model = nn.Sequential(BayesConv2d(1, 4, 3, sigma0=0.05), BayesBatchNorm2d(4, sigma0=0.05), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.Flatten(), BayesLinear(4 * 6 * 6, 5, sigma0=0.3),
                          BayesLinear(5, 2, bias=False, sigma0=0.3)).double()
    _randomize(model, seed=5)
    want = torch.zeros((), dtype=torch.float64)
    for m in model:
        sigma0 = getattr(m, "sigma0", None)
        for name, p in m.named_parameters():
            if name.endswith("_mu"):
                log_sigma = getattr(m, name[:-3] + "_log_sigma")
                want = want + torch.distributions.kl_divergence(
                    torch.distributions.Normal(p, log_sigma.exp()),
                    torch.distributions.Normal(torch.zeros_like(p), sigma0)).sum()
    got = kl_divergence(model)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # the per-layer sum, and differentiable in mu and log_sigma
    torch.testing.assert_close(got, sum(m.kl() for m in model if hasattr(m, "kl")), rtol=1e-14, atol=0)
    got.backward()
    assert model[0].weight_log_sigma.grad is not None and model[5].weight_mu.grad.abs().sum() > 0


def test_kl_of_a_model_without_bayesian_layers_is_zero():
    model = nn.Sequential(nn.Linear(3, 2), NoiseInjection(0.1))
    kl = kl_divergence(model)
    assert kl.shape == () and kl.item() == 0.0
    assert kl_divergence(nn.ReLU()).item() == 0.0
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        kl_divergence(torch.zeros(3))


# --------------------------------------------------------------------------------------------------
# Per-sample draws: batched == loop, and the loop is the layer with the drawn weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (3, 2, 7)], ids=["2d", "3d"])
def test_bayes_linear_batched_equals_loop(bias, shape):
    layer = _randomize(BayesLinear(7, 4, bias=bias)).double()
    x = torch.randn(*shape, dtype=torch.float64)
    batched, loop = _batched_and_loop(layer, x, 4, seed=3)
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-12)
    assert (loop[0] - loop[1]).abs().max() > 1e-3  # the samples differ
    # sample i of the loop is F.linear with draw i of the weights
    with sampling(layer, 4, seed=3):
        w, b = layer.sample("weight", 0), (layer.sample("bias", 1) if bias else None)
    for i in range(4):
        torch.testing.assert_close(loop[i], F.linear(x, w[i], None if b is None else b[i]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": (3, 2), "stride": 2, "padding": (0, 1), "bias": False},
    {"kernel_size": 3, "padding": "same", "dilation": 2, "groups": 2},
], ids=["pad1", "stride2-nobias", "same-dilated-groups"])
def test_bayes_conv_batched_equals_loop(config):
    layer = _randomize(BayesConv2d(4, 6, **config)).double()
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    batched, loop = _batched_and_loop(layer, x, 3, seed=8)
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-12)
    assert (loop[0] - loop[2]).abs().max() > 1e-3
    with sampling(layer, 3, seed=8):
        w = layer.sample("weight", 0)
        b = layer.sample("bias", 1) if layer.has_bias else None
    for i in range(3):
        want = F.conv2d(x, w[i], None if b is None else b[i], layer.stride, layer.padding, layer.dilation, layer.groups)
        torch.testing.assert_close(loop[i], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bayes_batchnorm_batched_equals_loop(train):
    torch.manual_seed(0)
    a = _randomize(BayesBatchNorm2d(3)).double().train(train)
    with torch.no_grad():
        a.norm.running_mean.uniform_(-1, 1)
        a.norm.running_var.uniform_(0.5, 2)
    b = BayesBatchNorm2d(3).double().train(train)
    b.load_state_dict(a.state_dict())
    running_mean, running_var = a.norm.running_mean.clone(), a.norm.running_var.clone()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with sampling(a, 3, seed=2):
        batched = a(x.repeat(3, 1, 1, 1)).view(3, *x.shape)
    loop = []
    for i in range(3):
        with sampling(b, 3, seed=2, index=i):
            loop.append(b(x))
    loop = torch.stack(loop)
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-10)
    # the running statistics moved as 3 sequential forwards (or not at all in eval mode)
    torch.testing.assert_close(a.norm.running_var, b.norm.running_var, rtol=1e-12, atol=1e-12)
    assert torch.equal(a.norm.num_batches_tracked, b.norm.num_batches_tracked)
    assert train != torch.allclose(a.norm.running_mean, running_mean)
    # sample i is normalize(x) * gamma_i + beta_i
    with sampling(b, 3, seed=2):
        gamma, beta = b.sample("weight", 0), b.sample("bias", 1)
    if train:
        normed = F.batch_norm(x, None, None, training=True)
    else:
        normed = (x - running_mean.view(1, -1, 1, 1)) / (running_var.view(1, -1, 1, 1) + 1e-5).sqrt()
    for i in range(3):
        torch.testing.assert_close(loop[i], normed * gamma[i].view(1, -1, 1, 1) + beta[i].view(1, -1, 1, 1),
                                   rtol=1e-10, atol=1e-10)
    assert (loop[0] - loop[1]).abs().max() > 1e-3


def test_noise_injection_batched_equals_loop_and_is_per_element():
    layer = NoiseInjection(0.3)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    batched, loop = _batched_and_loop(layer, x, 4, seed=9)
    torch.testing.assert_close(batched, loop, rtol=0, atol=0)
    noise = (loop - x) / 0.3
    # independent per sample, per example and per element
    assert (noise[0] - noise[1]).abs().min() > 0
    assert (noise[:, 0] - noise[:, 1]).abs().min() > 0
    assert noise.unique().numel() == noise.numel()


def test_noise_injection_statistics_and_eval_mode():
    layer = NoiseInjection(0.2).eval()  # RSE keeps its noise at inference
    x = torch.full((20000,), 3.0)
    out = layer(x)
    assert abs(out.mean().item() - 3.0) < 4 * 0.2 / math.sqrt(x.numel())
    assert abs(out.std().item() - 0.2) < 0.01
    assert not torch.equal(layer(x[:10]), layer(x[:10]))


# --------------------------------------------------------------------------------------------------
# Draws outside contexts, frozen samples, seeds
# --------------------------------------------------------------------------------------------------


def _small_bayes_cnn(kind: str = "bayes", bn: bool = False) -> nn.Module:
    layers = [BayesConv2d(1, 3, 3, padding=1) if kind == "bayes" else nn.Conv2d(1, 3, 3, padding=1)]
    if kind == "noise":
        layers.insert(0, NoiseInjection(0.2))
    if bn:
        layers.append(BayesBatchNorm2d(3) if kind == "bayes" else nn.BatchNorm2d(3))
    layers += [nn.Tanh(), nn.MaxPool2d(2)]
    if kind == "noise":
        layers.append(NoiseInjection(0.1))
    layers += [nn.Flatten(), BayesLinear(3 * 3 * 3, 4) if kind == "bayes" else nn.Linear(3 * 3 * 3, 4)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("kind", ["bayes", "noise"])
def test_fresh_draws_outside_contexts(kind):
    torch.manual_seed(0)
    model = _small_bayes_cnn(kind).eval()
    x = torch.rand(2, 1, 6, 6)
    torch.manual_seed(1)
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # a new sample model per forward (Adv-BNN / RSE)
    torch.manual_seed(1)
    torch.testing.assert_close(model(x), a, rtol=0, atol=0)  # from the global RNG


@pytest.mark.parametrize("kind", ["bayes", "noise"])
def test_frozen_sample_is_deterministic_and_seeds_differ(kind):
    torch.manual_seed(0)
    model = _small_bayes_cnn(kind).eval()
    x = torch.rand(3, 1, 6, 6)
    with frozen_sample(model, seed=4):
        a = model(x)
        torch.testing.assert_close(model(x), a, rtol=0, atol=0)
        # nested sampling inside a frozen block: every sample is the pinned one
        with sampling(model, 3, seed=99):
            rep = model(x.repeat(3, 1, 1, 1)).view(3, 3, -1)
        torch.testing.assert_close(rep, a.expand(3, -1, -1), rtol=1e-5, atol=1e-6)
    with frozen_sample(model, seed=4):
        torch.testing.assert_close(model(x), a, rtol=0, atol=0)
    with frozen_sample(model, seed=5):
        assert not torch.allclose(model(x), a)
    outs = []
    for _ in sample_models(model, 3, seed=1):
        outs.append(model(x))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_frozen_bayes_weights_do_not_depend_on_batch_size():
    torch.manual_seed(0)
    model = _small_bayes_cnn("bayes").eval()
    x = torch.rand(4, 1, 6, 6)
    with frozen_sample(model, seed=2):
        torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-5, atol=1e-6)


def test_sampling_seeds_differ_and_repeat():
    torch.manual_seed(0)
    layer = BayesLinear(5, 3)
    x = torch.randn(2, 5)
    with sampling(layer, 2, seed=1):
        a = layer(x.repeat(2, 1))
        torch.testing.assert_close(layer(x.repeat(2, 1)), a, rtol=0, atol=0)
    with sampling(layer, 2, seed=2):
        assert not torch.allclose(layer(x.repeat(2, 1)), a)


# --------------------------------------------------------------------------------------------------
# sample_input_grads through Bayesian / noise CNNs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,bn,train", [
    ("bayes", False, False), ("noise", False, False), ("bayes", True, True), ("noise", True, True),
], ids=["bayes", "noise", "bayes-bn-train", "noise-bn-train"])
def test_sample_input_grads_batched_equals_loop(kind, bn, train):
    torch.manual_seed(0)
    model = _randomize(_small_bayes_cnn(kind, bn)).double().train(train)
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    gb, lb = fastdiv.sample_input_grads(model, x, y, 5, strategy="batched", generator=21)
    gl, ll = fastdiv.sample_input_grads(model, x, y, 5, strategy="loop", generator=21)
    torch.testing.assert_close(gb, gl, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(lb, ll, rtol=1e-9, atol=1e-11)
    assert (gb[0] - gb[1]).abs().max() > 1e-4  # n different sample models
    # the 'auto' strategy batches these models
    assert fastdiv.nn.supports_batched(model)


@pytest.mark.parametrize("strategy", ["batched", "loop"])
def test_double_backward_gradcheck(strategy):
    """create_graph=True: a penalty on the sample gradients differentiates to mu and log_sigma."""
    torch.manual_seed(0)
    base = _randomize(nn.Sequential(BayesConv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), BayesLinear(2 * 2 * 2, 3))).double()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 2])
    names = ["0.weight_mu", "0.weight_log_sigma", "3.weight_mu", "3.bias_log_sigma"]
    params = dict(base.named_parameters())

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            self.override = {}

        def forward(self, inp):
            return torch.func.functional_call(self.base, {**params, **self.override}, (inp,))

    wrapper = Functional()

    def penalty(*tensors):
        wrapper.override = dict(zip(names, tensors))
        grads, _ = fastdiv.sample_input_grads(wrapper, x, y, 3, create_graph=True, strategy=strategy, generator=5)
        return fastdiv.reference.mean_cosine_loss(grads.transpose(0, 1).flatten(2)).sum() + grads.pow(2).sum()

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(penalty, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# State dicts, dtypes, bad input
# --------------------------------------------------------------------------------------------------


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = _randomize(_small_bayes_cnn("bayes", bn=True))
    with torch.no_grad():
        model[1].norm.running_mean.uniform_(-1, 1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    torch.manual_seed(1)
    other = _small_bayes_cnn("bayes", bn=True)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    assert set(model.state_dict()) == {
        "0.weight_mu", "0.weight_log_sigma", "0.bias_mu", "0.bias_log_sigma", "1.weight_mu", "1.weight_log_sigma",
        "1.bias_mu", "1.bias_log_sigma", "1.norm.running_mean", "1.norm.running_var", "1.norm.num_batches_tracked",
        "5.weight_mu", "5.weight_log_sigma", "5.bias_mu", "5.bias_log_sigma"}
    x = torch.rand(2, 1, 6, 6)
    for m in (model, other):
        m.eval()
    with sampling(model, 3, seed=4):
        a = model(x.repeat(3, 1, 1, 1))
    with sampling(other, 3, seed=4):
        b = other(x.repeat(3, 1, 1, 1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_init_like_torch_layers():
    torch.manual_seed(0)
    lin = BayesLinear(300, 200, sigma0=0.05)
    bound = 1 / math.sqrt(300)
    assert lin.weight_mu.abs().max() <= bound and lin.weight_mu.abs().max() > 0.9 * bound
    assert lin.bias_mu.abs().max() <= bound
    torch.testing.assert_close(lin.weight_log_sigma, torch.full((200, 300), math.log(0.05)))
    conv = BayesConv2d(8, 4, 3, sigma0=0.1, sigma_init=0.01)
    assert conv.weight_mu.abs().max() <= 1 / math.sqrt(72)
    torch.testing.assert_close(conv.bias_log_sigma, torch.full((4,), math.log(0.01)))
    bn = BayesBatchNorm2d(5)
    assert torch.equal(bn.weight_mu, torch.ones(5)) and torch.equal(bn.bias_mu, torch.zeros(5))


def test_float64_and_keeps_dtype():
    layer = BayesConv2d(2, 3, 3).double()
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    assert layer(x).dtype == torch.float64
    with sampling(layer, 2, seed=0):
        assert layer(x.repeat(2, 1, 1, 1)).dtype == torch.float64
    assert NoiseInjection(0.1)(x).dtype == torch.float64


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_sigma(bad):
    with pytest.raises(ValueError, match="sigma0 must be a positive finite number"):
        BayesLinear(2, 3, sigma0=bad)
    with pytest.raises(ValueError, match="sigma0 must be a positive finite number"):
        BayesConv2d(2, 3, 3, sigma0=bad)
    with pytest.raises(ValueError, match="sigma0 must be a positive finite number"):
        BayesBatchNorm2d(2, sigma0=bad)
    with pytest.raises(ValueError, match="sigma must be a positive finite number"):
        NoiseInjection(bad)
    with pytest.raises(ValueError, match="sigma_init must be a positive finite number"):
        BayesLinear(2, 3, sigma_init=bad)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="in_features must be an int >= 1"):
        BayesLinear(0, 3)
    with pytest.raises(ValueError, match="out_channels must be an int >= 1"):
        BayesConv2d(2, 2.5, 3)
    with pytest.raises(ValueError, match="divisible by groups"):
        BayesConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding must be"):
        BayesConv2d(2, 2, 3, padding="full")
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        BayesConv2d(2, 2, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="kernel_size must be a positive int"):
        BayesConv2d(2, 2, 0)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"expected input \[N, \*, 4\]"):
        BayesLinear(4, 2)(torch.rand(3, 5))
    with pytest.raises(ValueError, match=r"expected input \[N, 3, H, W\]"):
        BayesConv2d(3, 2, 3)(torch.rand(2, 1, 5, 5))
    with pytest.raises(ValueError, match=r"expected input \[N, 3, H, W\]"):
        BayesBatchNorm2d(3)(torch.rand(2, 3, 5))
    layer, noise = BayesLinear(4, 2), NoiseInjection(0.1)
    with sampling(layer, 3, seed=0), sampling(noise, 3, seed=0):
        with pytest.raises(ValueError, match="must be 3 \\* batch"):
            layer(torch.rand(4, 4))
        with pytest.raises(ValueError, match="must be 3 \\* batch"):
            noise(torch.rand(4, 4))


# --------------------------------------------------------------------------------------------------
# Draws reused within one sampling block (SampleState.memo)
# --------------------------------------------------------------------------------------------------


def _bayes_noise_net() -> nn.Module:
    torch.manual_seed(0)
    return _randomize(nn.Sequential(BayesLinear(5, 7), NoiseInjection(0.3), nn.Tanh(), BayesLinear(7, 3))).double()


@pytest.mark.parametrize("index", [None, 2])
def test_a_second_forward_in_one_block_reuses_the_draws(monkeypatch, index):
    """Two no-grad forwards under one sampling state draw each layer's noise once and give what two
    separate blocks give (the draws are a function of the state)."""
    net, x = _bayes_noise_net(), torch.randn(4, 5, dtype=torch.float64)
    rows = x.repeat(3, 1) if index is None else x
    with torch.no_grad(), sampling(net, 3, 9, index=index):
        expected = net(rows)
    calls = []
    real = RandomizedModule._draw_samples
    monkeypatch.setattr(RandomizedModule, "_draw_samples", lambda self, *a: calls.append(1) or real(self, *a))
    with torch.no_grad(), sampling(net, 3, 9, index=index):
        first, second = net(rows), net(rows)
    assert len(calls) == 5  # two weights + two biases + one noise draw, for both forwards
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


def test_reused_weights_follow_a_parameter_change_and_never_carry_a_graph():
    net, x = _bayes_noise_net(), torch.randn(4, 5, dtype=torch.float64)
    with sampling(net, 2, 1, index=0):
        with torch.no_grad():
            before = net(x)
            net[3].weight_mu.add_(1.0)  # an in-place update bumps the version: the weight is drawn again
            after = net(x)
        assert not torch.equal(before, after)
        # with a graph the weights are drawn per forward: two backward passes through two forwards work
        for _ in range(2):
            net(x).sum().backward()
    with torch.no_grad(), sampling(net, 2, 1, index=0):
        torch.testing.assert_close(net(x), after, rtol=0, atol=0)
    assert net[3].weight_mu.grad is not None


def test_frozen_sample_reuses_its_draws_across_batch_sizes_of_the_same_shape():
    net = _bayes_noise_net()
    x = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad(), frozen_sample(net, seed=3):
        a, b = net(x), net(x[:2])
        c = net(x)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert b.shape == (2, 3)
