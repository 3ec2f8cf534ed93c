"""The architectures of fastdiv.nn.build_model: layouts, kinds, shapes, the D3 shared prefix,
sample-batched gradients vs the loop, state dicts, bad input."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fastdiv
from fastdiv.nn import (
    MODELS,
    BayesBatchNorm2d,
    BayesConv2d,
    BayesLinear,
    NoiseInjection,
    SharedPrefix,
    build_model,
    frozen_sample,
    kl_divergence,
    sampling,
)
from fastdiv.nn.models import KINDS, PAPER_SHAPES

DIGITS = (1, 8, 8)
HEAVY = ("vgg16", "resnet18", "d3-vgg16")  # ~10M weights: every Bayesian forward draws all of them n times


def _count(model: nn.Module, cls) -> int:
    return sum(type(m) is cls for m in model.modules())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_grads(model, shape, n=2, batch=2, loop=True, rtol=1e-4):
    """sample_input_grads in eval mode, batched (and looped) on a [batch, *shape] input."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape, generator=gen)
    y = torch.arange(batch) % model.num_classes
    gb, lb = fastdiv.sample_input_grads(model, x, y, n, strategy="batched", generator=3)
    assert gb.shape == (n, batch, *shape) and lb.shape == (n, batch, model.num_classes)
    assert torch.isfinite(gb).all() and torch.isfinite(lb).all() and gb.abs().sum() > 0
    if model.kind != "deterministic":
        assert (lb[0] - lb[1]).abs().max() > 1e-6, "the sample models should differ"
    if loop:
        gl, ll = fastdiv.sample_input_grads(model, x, y, n, strategy="loop", generator=3)
        scale = gl.abs().max()
        torch.testing.assert_close(gb, gl, rtol=rtol, atol=rtol * scale)
        torch.testing.assert_close(lb, ll, rtol=rtol, atol=rtol * lb.abs().max())
    return gb


# --------------------------------------------------------------------------------------------------
# Every architecture x kind on digits-, MNIST- and paper-shaped input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_runs_on_digits(name, kind):
    torch.manual_seed(0)
    model = build_model(name, in_shape=DIGITS, num_classes=10, kind=kind)
    # train mode (batch statistics): forward and the batched gradients run
    out = model(torch.rand(3, *DIGITS))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    _check_grads(model, DIGITS, loop=False)
    # eval mode: batched == loop (float32; train-mode BN on 2 examples is too ill-conditioned to compare)
    model.eval()
    _check_grads(model, DIGITS, loop=name not in HEAVY or kind != "bayes")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [m for m in MODELS if m not in HEAVY])
def test_runs_on_mnist_and_paper_shape(name, kind):
    torch.manual_seed(0)
    for shape in {(1, 28, 28), PAPER_SHAPES[name]}:
        model = build_model(name, in_shape=shape, num_classes=7, kind=kind).eval()
        _check_grads(model, shape, loop=shape == PAPER_SHAPES[name])


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", HEAVY)
def test_heavy_models_on_mnist_and_paper_shape(name, kind):
    torch.manual_seed(0)
    for shape in {(1, 28, 28), PAPER_SHAPES[name]}:
        model = build_model(name, in_shape=shape, kind=kind).eval()
        _check_grads(model, shape, loop=shape == PAPER_SHAPES[name])


@pytest.mark.parametrize("name,kind", [("graddiv-stl10", "bayes"), ("resnet20", "noise"), ("resnet20", "bayes")])
def test_batchnorm_models_in_train_mode_batched_equals_loop(name, kind):
    """Train-mode BN: each sample's rows are normalized on their own and running stats match the loop."""
    torch.manual_seed(0)
    a = build_model(name, in_shape=DIGITS, kind=kind).double()
    b = build_model(name, in_shape=DIGITS, kind=kind).double()
    b.load_state_dict(a.state_dict())
    x = torch.rand(4, *DIGITS, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4])
    gb, lb = fastdiv.sample_input_grads(a, x, y, 3, strategy="batched", generator=8)
    gl, ll = fastdiv.sample_input_grads(b, x, y, 3, strategy="loop", generator=8)
    torch.testing.assert_close(gb, gl, rtol=1e-7, atol=1e-9 * gl.abs().max())
    torch.testing.assert_close(lb, ll, rtol=1e-7, atol=1e-9)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}")


# --------------------------------------------------------------------------------------------------
# Layouts: the papers' layers at the paper's input shape
# --------------------------------------------------------------------------------------------------


def test_known_parameter_counts():
    # hand counts / the usual reference implementations (weights + biases + BN affine)
    lenet = 156 + 2416 + 48120 + 10164 + 850
    assert _params(build_model("lenet5")) == lenet
    assert _params(build_model("vgg16")) == 14_728_266  # kuangliu/pytorch-cifar VGG('VGG16')
    assert _params(build_model("resnet18")) == 11_173_962  # kuangliu/pytorch-cifar ResNet18
    # CIFAR ResNet-20 is 269,722 with zero-padding shortcuts; ours projects with 1x1 conv + BN twice
    assert _params(build_model("resnet20")) == 269_722 + (16 * 32 + 64) + (32 * 64 + 128)
    mnist = (9 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128) + (128 * 7 * 7 * 1024 + 1024) + (1024 * 10 + 10)
    assert _params(build_model("graddiv-mnist")) == mnist == _params(build_model("conv3"))
    # Bayesian: two tensors (mu, log_sigma) per weight
    assert _params(build_model("graddiv-mnist", kind="bayes")) == 2 * mnist


def test_paper_layouts():
    stl = build_model("graddiv-stl10")
    assert stl.head.in_features == 512 and _count(stl, nn.Conv2d) == 6 and _count(stl, nn.BatchNorm2d) == 6
    convs = [m for m in stl.modules() if isinstance(m, nn.Conv2d)]
    assert [c.padding for c in convs] == [(1, 1)] * 4 + [(0, 0)] * 2  # C(256,3,1), C(512,3,1) unpadded
    assert next(m for m in build_model("graddiv-mnist").body if isinstance(m, nn.Linear)).in_features == 128 * 7 * 7
    assert build_model("conv4").body[-2].in_features == 128 * 8 * 8
    assert _count(build_model("vgg16"), nn.Conv2d) == 13 and build_model("vgg16").head.in_features == 512
    assert _count(build_model("resnet26"), nn.Conv2d) == 1 + 2 * 12 + 2
    assert isinstance(build_model("conv3").body[1], nn.LeakyReLU)
    assert isinstance(build_model("resnet20").body[2], nn.LeakyReLU)
    lenet = build_model("lenet5")
    assert [c.out_channels for c in lenet.modules() if isinstance(c, nn.Conv2d)] == [6, 16, 120]
    assert lenet.head.in_features == 84
    d3 = build_model("d3-mnist")
    assert _count(d3, nn.Conv2d) == 3 and _count(d3, nn.Linear) == 2


def test_digits_adaptation_rules():
    # 8x8: pools skipped below 2 pixels, unpadded convs padded when the input is smaller than the kernel
    stl = build_model("graddiv-stl10", in_shape=DIGITS)
    assert _count(stl, nn.MaxPool2d) == 3
    assert [c.padding for c in stl.modules() if isinstance(c, nn.Conv2d)][-2:] == [(1, 1), (1, 1)]
    lenet = build_model("lenet5", in_shape=DIGITS)
    assert [c.padding for c in lenet.modules() if isinstance(c, nn.Conv2d)] == [(2, 2), (2, 2), (2, 2)]
    assert lenet.body[-2].in_features == 120 * 2 * 2
    assert _count(build_model("vgg16", in_shape=DIGITS), nn.MaxPool2d) == 3
    assert build_model("graddiv-mnist", in_shape=DIGITS).body[-2].in_features == 128 * 2 * 2
    # a non-square input works too
    model = build_model("graddiv-stl10", in_shape=(2, 5, 40), num_classes=3)
    assert model(torch.rand(2, 2, 5, 40)).shape == (2, 3)


@pytest.mark.parametrize("name", MODELS)
def test_bayes_and_noise_kinds(name):
    det = build_model(name, in_shape=DIGITS)
    convs, linears, bns = _count(det, nn.Conv2d), _count(det, nn.Linear), _count(det, nn.BatchNorm2d)
    bayes = build_model(name, in_shape=DIGITS, kind="bayes", sigma0=0.05)
    noise = build_model(name, in_shape=DIGITS, kind="noise", sigma_init=0.3, sigma_inner=0.07)
    sigmas = [m.sigma for m in noise.modules() if isinstance(m, NoiseInjection)]
    if name.startswith("d3-"):
        suffix_convs = 1 if name == "d3-mnist" else 3
        assert _count(bayes, BayesConv2d) == suffix_convs and _count(bayes, nn.Conv2d) == convs - suffix_convs
        assert _count(bayes, BayesLinear) == linears and _count(bayes, nn.Linear) == 0
        assert _count(bayes, BayesBatchNorm2d) == (3 if name == "d3-vgg16" else 0)
        assert isinstance(bayes.body[0], SharedPrefix) and isinstance(noise.body[0], SharedPrefix)
        assert sigmas == [0.07] * suffix_convs
    else:  # Adv-BNN: every conv, linear and BN layer Bayesian
        assert _count(bayes, nn.Conv2d) == _count(bayes, nn.Linear) == 0
        assert _count(bayes, BayesConv2d) == convs and _count(bayes, BayesLinear) == linears
        # a BayesBatchNorm2d normalizes with an inner affine-free BatchNorm2d
        assert _count(bayes, BayesBatchNorm2d) == bns == _count(bayes, nn.BatchNorm2d)
        assert not any(m.affine for m in bayes.modules() if isinstance(m, nn.BatchNorm2d))
        # RSE: noise before every 3x3/5x5 conv (not before 1x1 shortcut projections), sigma_init on the input
        shortcuts = sum(1 for m in det.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
        assert sigmas == [0.3] + [0.07] * (convs - shortcuts - 1)
    assert all(b.sigma0 == 0.05 for b in bayes.modules() if hasattr(b, "sigma0"))
    assert kl_divergence(det).item() == 0 and kl_divergence(bayes).item() > 0


# --------------------------------------------------------------------------------------------------
# The shared deterministic prefix of the Diverse Directions nets
# --------------------------------------------------------------------------------------------------


def test_shared_prefix_runs_once_without_input_grad_and_equals_loop():
    torch.manual_seed(0)
    model = build_model("d3-mnist", in_shape=DIGITS, kind="bayes").eval()
    prefix = model.body[0]
    rows = []
    prefix.module.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    x = torch.rand(3, *DIGITS)
    with torch.no_grad(), sampling(model, 4, seed=5):
        batched = model(x.repeat(4, 1, 1, 1)).view(4, 3, -1)
    assert rows == [3]  # once, on the un-replicated batch
    loop = []
    for i in range(4):
        with torch.no_grad(), sampling(model, 4, seed=5, index=i):
            loop.append(model(x))
    torch.testing.assert_close(batched, torch.stack(loop), rtol=1e-5, atol=1e-6)
    # an input that needs per-sample gradients takes the full path
    fastdiv.nn.detect_randomness(model, x)  # the randomness probe's forwards (cached from here on)
    rows.clear()
    gb, _ = fastdiv.sample_input_grads(model, x, torch.tensor([1, 2, 3]), 4, strategy="batched", generator=5)
    gl, _ = fastdiv.sample_input_grads(model, x, torch.tensor([1, 2, 3]), 4, strategy="loop", generator=5)
    assert rows[0] == 12
    torch.testing.assert_close(gb, gl, rtol=1e-4, atol=1e-6 * gl.abs().max())
    assert (gb[0] - gb[1]).abs().max() > 1e-4  # a shared prefix would have given sample 0 the sum


def test_shared_prefix_parameter_gradients_match_the_loop():
    """A classification loss over the k sample models (no input gradient): the prefix runs once and its
    parameter gradient is the sum over samples, as in the loop."""
    torch.manual_seed(0)
    a = build_model("d3-mnist", in_shape=DIGITS, kind="bayes")
    b = build_model("d3-mnist", in_shape=DIGITS, kind="bayes")
    b.load_state_dict(a.state_dict())
    x, y = torch.rand(3, *DIGITS), torch.tensor([0, 4, 9])
    with sampling(a, 3, seed=1):
        nn.functional.cross_entropy(a(x.repeat(3, 1, 1, 1)), y.repeat(3), reduction="sum").backward()
    for i in range(3):
        with sampling(b, 3, seed=1, index=i):
            nn.functional.cross_entropy(b(x), y, reduction="sum").backward()
    for (key, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_shared_prefix_with_train_mode_batchnorm_runs_all_rows():
    torch.manual_seed(0)
    prefix = SharedPrefix(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    model = nn.Sequential(prefix, nn.Flatten(), BayesLinear(2 * 6 * 6, 3))
    x = torch.rand(2, *DIGITS)
    with torch.no_grad(), sampling(model, 2, seed=0):
        assert not prefix.shares(x.repeat(2, 1, 1, 1))
        model.eval()
        assert prefix.shares(x.repeat(2, 1, 1, 1))
    assert not prefix.shares(x)  # outside a batched context there is nothing to share
    with pytest.raises(ValueError, match="module must be deterministic"):
        SharedPrefix(nn.Sequential(nn.Linear(2, 2), NoiseInjection(0.1)))
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        SharedPrefix(lambda t: t)


# --------------------------------------------------------------------------------------------------
# Randomness, state dicts, bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name, kind):
    torch.manual_seed(0)
    model = build_model(name, in_shape=DIGITS, kind=kind)
    model(torch.rand(4, *DIGITS))  # move the BN running statistics away from their init
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    other = build_model(name, in_shape=DIGITS, kind=kind).eval()
    other.load_state_dict(torch.load(buf))
    x = torch.rand(2, *DIGITS)
    with torch.no_grad(), sampling(model, 2, seed=6):
        a = model(x.repeat(2, 1, 1, 1))
    with torch.no_grad(), sampling(other, 2, seed=6):
        b = other(x.repeat(2, 1, 1, 1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["bayes", "noise"])
def test_model_draws_fresh_outside_contexts_and_freezes(kind):
    torch.manual_seed(0)
    model = build_model("graddiv-mnist", in_shape=DIGITS, kind=kind).eval()
    x = torch.rand(2, *DIGITS)
    assert not torch.allclose(model(x), model(x))  # inference draws a new sample model every call
    with frozen_sample(model, seed=3):
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    det = build_model("graddiv-mnist", in_shape=DIGITS).eval()
    torch.testing.assert_close(det(x), det(x), rtol=0, atol=0)
    assert fastdiv.nn.is_randomized(model) and not fastdiv.nn.is_randomized(det)


def test_wrong_input_shape_fails_at_the_first_layer():
    model = build_model("graddiv-mnist", kind="bayes")
    with pytest.raises(ValueError, match=r"graddiv-mnist: expected input of shape \[N, 1, 28, 28\].*\(2, 3, 28, 28\)"):
        model(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"expected input of shape \[N, 1, 28, 28\]"):
        model(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"expected input of shape \[N, 1, 28, 28\]"):
        model(torch.rand(1, 28, 28))
    with pytest.raises(TypeError, match="floating-point input"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.long))
    with pytest.raises(ValueError, match=r"resnet18: expected input of shape \[N, 1, 8, 8\]"):
        build_model("resnet18", in_shape=DIGITS)(torch.rand(2, 3, 32, 32))


def test_build_model_bad_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="kind must be one of"):
        build_model("conv3", kind="bnn")
    for bad in [(28, 28), (1, 0, 28), (1, 28, 28.0), "1x28x28"]:
        with pytest.raises(ValueError, match="in_shape must be"):
            build_model("conv3", in_shape=bad)
    for bad in [1, 0, 2.0, True]:
        with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
            build_model("conv3", num_classes=bad)
    for arg in ("sigma0", "sigma_init", "sigma_inner"):
        with pytest.raises(ValueError, match=f"{arg} must be a positive finite number"):
            build_model("conv3", **{arg: 0.0})


def test_default_shape_and_attributes():
    model = build_model("conv4", num_classes=5)
    assert model.in_shape == (3, 32, 32) and model.num_classes == 5 and model.num_features == 1024
    assert model.training and model.name == "conv4" and model.kind == "deterministic"
    x = torch.rand(2, 3, 32, 32)
    feats = model.body(x)
    assert feats.shape == (2, model.num_features)
    torch.testing.assert_close(model(x), model.head(feats), rtol=0, atol=0)
