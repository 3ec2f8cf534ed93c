"""Models whose randomness is not fastdiv's: detection (layers, then the two-forward probe), the
caller's override, real independent forwards with a seeded global RNG, and the model modes
(MC dropout) — for sample_input_grads, predict and the attacks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastdiv
from fastdiv._seeds import mix_seed
from fastdiv.attacks import PGD, Square
from fastdiv.nn import PROBE_EXAMPLES, detect_randomness, is_stochastic, model_mode, predict


class NoisyInput(nn.Module):
    """A user's own noise-injection defense: fresh Gaussian noise from the global RNG at every forward."""

    def __init__(self, sigma: float = 0.3) -> None:
        super().__init__()
        self.sigma = sigma
        self.f = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 5))
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.f(x + self.sigma * torch.randn_like(x))


class McDropoutCNN(nn.Module):
    """BatchNorm and dropout: MC dropout keeps the masks random while BatchNorm uses running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Dropout(0.5), nn.Linear(64, 5))

    def forward(self, x):
        return self.body(x)


def batch(b: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 4, 4, generator=g), torch.randint(0, 5, (b,), generator=g)


def noisy(seed: int = 0, dtype=torch.float32) -> NoisyInput:
    torch.manual_seed(seed)
    return NoisyInput().to(dtype)


def test_the_probe_finds_randomness_drawn_inside_forward():
    model, (x, _) = noisy(), batch()
    assert not is_stochastic(model)  # the module types alone show nothing
    assert is_stochastic(model, x)
    verdict = detect_randomness(model, x)
    assert verdict and verdict.global_rng and not verdict.fastdiv_layers and not verdict.declared
    assert "differ" in verdict.reason
    deterministic = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    verdict = detect_randomness(deterministic, x)
    assert not verdict and "agree" in verdict.reason
    # a fastdiv randomized model follows the sampling protocol: stochastic, no global-RNG draws
    bnn = nn.Sequential(nn.Flatten(), fastdiv.nn.BayesLinear(16, 5))
    verdict = detect_randomness(bnn, x)
    assert verdict.fastdiv_layers and not verdict.global_rng


def test_the_probe_leaves_no_trace():
    model = McDropoutCNN().train()
    model.body[4].p = 0.0  # no dropout: only a noise hook makes it random
    model.body[0].register_forward_hook(lambda m, i, o: o + 0.1 * torch.randn_like(o))
    x, _ = batch(8)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    assert detect_randomness(model, x).global_rng
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is where it was
    for k, v in model.state_dict().items():  # BatchNorm's running statistics are untouched
        assert torch.equal(v, buffers[k]), k
    assert all(m.training for m in model.modules())


def test_the_probe_forwards_a_few_examples_once_per_mode():
    model, (x, _) = noisy(), batch(10)
    detect_randomness(model, x)
    assert model.forwards == 2
    detect_randomness(model, x)  # cached: same modes, device and input shape
    assert model.forwards == 2
    model.eval()
    detect_randomness(model, x)
    assert model.forwards == 4


def test_rounding_noise_is_not_randomness():
    class Jitter(nn.Module):  # what a non-deterministic GPU reduction looks like: last-place differences
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 5)

        def forward(self, x):
            z = self.lin(x.flatten(1))
            return z * (1 + 1e-7 * torch.rand(()))

    x, _ = batch()
    assert not detect_randomness(Jitter(), x)


def test_declared_overrides_the_probe():
    model, (x, y) = noisy(), batch()
    assert not detect_randomness(model, x, stochastic=False)
    assert model.forwards == 0  # no probe when the caller declares
    grads, _ = fastdiv.sample_input_grads(model, x, y, 4, generator=0, stochastic=False)
    assert model.forwards == 1 and all(torch.equal(grads[0], g) for g in grads)  # one gradient, copied
    deterministic = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    grads, _ = fastdiv.sample_input_grads(deterministic, x, y, 3, generator=0, stochastic=True)
    assert grads.shape == (3, *x.shape) and all(torch.equal(grads[0], g) for g in grads)
    with pytest.raises(TypeError, match="stochastic"):
        detect_randomness(model, x, stochastic="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_input_grads_of_a_global_rng_model_are_real_seeded_forwards(dtype):
    model, (x, y) = noisy(dtype=dtype), batch()
    x = x.to(dtype)
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    grads, logits = fastdiv.sample_input_grads(model, x, y, 5, generator=11)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded per sample, then restored
    assert grads.shape == (5, *x.shape)
    distinct = {tuple(g.flatten()[:6].tolist()) for g in grads}
    assert len(distinct) == 5  # five sample models, not one gradient copied five times
    for s in range(5):  # sample s is the forward with the global RNG seeded from (seed, s)
        torch.manual_seed(mix_seed(11, s))
        leaf = x.clone().requires_grad_(True)
        z = model(leaf)
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(z, y, reduction="sum"), leaf)
        torch.testing.assert_close(grads[s], g)
        torch.testing.assert_close(logits[s], z.detach())
    again, _ = fastdiv.sample_input_grads(model, x, y, 5, generator=11)
    assert torch.equal(again, grads)  # seeded: reproducible
    other, _ = fastdiv.sample_input_grads(model, x, y, 5, generator=12)
    assert not torch.equal(other, grads)


def test_batched_is_refused_for_global_rng_randomness():
    model, (x, y) = noisy(), batch()
    with pytest.raises(ValueError, match="global RNG.*shared by all n replicas"):
        fastdiv.sample_input_grads(model, x, y, 3, strategy="batched")
    # 'auto' picks the loop for it on every device
    assert fastdiv.grads.resolve_strategy(model, x, "auto", randomness=detect_randomness(model, x)) == "loop"


def test_predict_averages_real_forwards_of_a_global_rng_model():
    model, (x, _) = noisy(), batch()
    probs = predict(model, x, num_samples=6, seed=3)
    ref = 0
    for s in range(6):
        torch.manual_seed(mix_seed(3, s))
        ref = ref + model(x).softmax(-1).detach()
    torch.testing.assert_close(probs, ref / 6)
    torch.testing.assert_close(predict(model, x, num_samples=6, seed=3), probs)
    one = predict(model, x, num_samples=6, seed=3, stochastic=False)  # declared deterministic: one forward
    assert not torch.allclose(one, probs)


def test_model_mode_mc_dropout_keeps_dropout_active_and_batchnorm_in_eval():
    model = McDropoutCNN().train()
    with model_mode(model, "mc-dropout"):
        assert not model.body[1].training and model.body[4].training and not model.training
    assert all(m.training for m in model.modules())
    with model_mode(model.eval(), "train"):
        assert all(m.training for m in model.modules())
    assert not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="mode must be one of"):
        with model_mode(model, "dropout"):
            pass


def test_attacks_on_an_mc_dropout_model():
    torch.manual_seed(0)
    model = McDropoutCNN().eval()
    x, y = batch(8)
    running = model.body[1].running_mean.clone()
    # eval mode: deterministic, so all three EOT forms agree
    plain = PGD(model, eps=0.1, steps=3, seed=0)(x, y)
    assert torch.equal(plain, PGD(model, eps=0.1, steps=3, seed=0, eot="fixed")(x, y))
    # MC dropout: stochastic, real per-sample masks; BatchNorm's statistics are never updated
    mc = PGD(model, eps=0.1, steps=3, seed=0, model_mode="mc-dropout", eot_samples=4)(x, y)
    assert not torch.equal(mc, plain)
    assert torch.equal(mc, PGD(model, eps=0.1, steps=3, seed=0, model_mode="mc-dropout", eot_samples=4)(x, y))
    assert torch.equal(model.body[1].running_mean, running)
    assert not any(m.training for m in model.modules())
    # [Attack]: one dropout mask for the whole call, the one the call's seed gives
    fixed = PGD(model, eps=0.1, steps=3, seed=0, model_mode="mc-dropout", eot="fixed")(x, y)
    assert torch.equal(fixed, PGD(model, eps=0.1, steps=3, seed=0, model_mode="mc-dropout", eot="fixed")(x, y))
    assert not torch.equal(fixed, PGD(model, eps=0.1, steps=3, seed=1, model_mode="mc-dropout", eot="fixed")(x, y))


def test_fixed_pins_one_sample_of_a_global_rng_model():
    """eot='fixed' re-seeds the global RNG with the fixed sample's seed before every gradient: every step
    sees the same noise, so the attack is a white-box attack on that one sample model."""
    model, (x, y) = noisy(), batch()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(torch.randn(3)))
    PGD(model, eps=0.1, steps=4, seed=2, eot="fixed", stochastic=True)(x, y)
    assert len(seen) == 4 and all(torch.equal(s, seen[0]) for s in seen)
    seen.clear()
    PGD(model, eps=0.1, steps=4, seed=2, eot="one", stochastic=True)(x, y)
    assert len({tuple(s.tolist()) for s in seen}) == 4  # EOT¹: a fresh sample model per step


def test_attacks_on_a_global_rng_model():
    model, (x, y) = noisy(), batch()
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    adv = PGD(model, eps=0.1, steps=4, seed=1, eot_samples=3)(x, y)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(adv, PGD(model, eps=0.1, steps=4, seed=1, eot_samples=3)(x, y))
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    # declared deterministic, the attack uses one forward per step instead of eot_samples
    model.forwards = 0
    PGD(model, eps=0.1, steps=4, seed=1, eot_samples=3, stochastic=False)(x, y)
    assert model.forwards == 4
    model.forwards = 0
    PGD(model, eps=0.1, steps=4, seed=1, eot_samples=3)(x, y)
    assert model.forwards == 4 * 3  # n real forwards per step (the probe's verdict is cached from above)
    sq = Square(model, eps=0.1, n_queries=5, seed=0, eot_samples=2)(x, y)
    assert torch.equal(sq, Square(model, eps=0.1, n_queries=5, seed=0, eot_samples=2)(x, y))
    with pytest.raises(TypeError, match="stochastic"):
        PGD(model, eps=0.1, stochastic=1)


def test_probe_uses_only_the_first_examples():
    model, (x, _) = noisy(), batch(PROBE_EXAMPLES + 5)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    detect_randomness(model, x)
    assert seen == [PROBE_EXAMPLES, PROBE_EXAMPLES]


def test_a_bayesian_torch_model():
    """Another library's Bayesian layers draw their weights from the global RNG at every forward (in eval
    mode too): found by the probe, and sampled by real, seeded forwards."""
    layers = pytest.importorskip("bayesian_torch.layers",
                                 reason="bayesian-torch is not installed (make test installs 0.5.0)")

    class BayesianMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = layers.LinearReparameterization(16, 24)
            self.fc2 = layers.LinearReparameterization(24, 5)

        def forward(self, x):
            h, _ = self.fc1(x.flatten(1))
            z, _ = self.fc2(torch.tanh(h))
            return z

    torch.manual_seed(0)
    model, (x, y) = BayesianMLP().eval(), batch()
    verdict = detect_randomness(model, x)
    assert verdict.global_rng and not verdict.fastdiv_layers
    grads, _ = fastdiv.sample_input_grads(model, x, y, 4, generator=2)
    assert len({tuple(g.flatten()[:6].tolist()) for g in grads}) == 4
    assert torch.equal(grads, fastdiv.sample_input_grads(model, x, y, 4, generator=2)[0])
    with pytest.raises(ValueError, match="global RNG"):
        fastdiv.sample_input_grads(model, x, y, 4, strategy="batched")
    probs = predict(model, x, num_samples=5, seed=1)
    assert not torch.allclose(probs, predict(model, x, num_samples=5, seed=1, stochastic=False))
    adv = PGD(model, eps=0.1, steps=3, seed=0, eot_samples=3)(x, y)
    assert torch.equal(adv, PGD(model, eps=0.1, steps=3, seed=0, eot_samples=3)(x, y))


def test_evaluate_a_bayesian_torch_model_from_python_and_the_cli(tmp_path):
    pytest.importorskip("bayesian_torch.layers", reason="bayesian-torch is not installed (make test installs 0.5.0)")
    import json

    from fastdiv.cli import main
    from fastdiv.evaluate import evaluate_model, validate_results

    (tmp_path / "bnn.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "from bayesian_torch.layers import LinearReparameterization\n\n\n"
        "class BayesianMLP(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc1, self.fc2 = LinearReparameterization(16, 24), LinearReparameterization(24, 5)\n\n"
        "    def forward(self, x):\n"
        "        h, _ = self.fc1(x.flatten(1))\n"
        "        return self.fc2(torch.tanh(h))[0]\n\n\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return BayesianMLP()\n")
    x, y = batch(10)
    import numpy as np

    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    settings = dict(attacks="fgsm,pgd", eps=[0.1], steps=2, eot_samples=2, ensemble_samples=3, grad_samples=3,
                    gaas_k=[4], gaas_examples=4, random_samples=2, transfer_models=2)
    from fastdiv.evaluate.inputs import load_factory

    res = evaluate_model(load_factory(f"{tmp_path / 'bnn.py'}:make"), (x, y), quiet=True, **settings)
    assert res["model"]["stochastic"] and "global RNG" in res["model"]["randomness"]
    assert len(res["table"]["rows"]) == 6 and res["gradients"]["stats"] is not None
    assert res["transfer"]["sample_models"] is not None
    out = tmp_path / "out"
    assert main(["evaluate", "--model", f"{tmp_path / 'bnn.py'}:make", "--data", str(tmp_path / "data.npz"),
                 "--out", str(out), "--attacks", "fgsm,pgd", "--eps", "0.1", "--steps", "2", "--eot-samples", "2",
                 "--ensemble-samples", "3", "--grad-samples", "3", "--gaas-k", "4", "--gaas-examples", "4",
                 "--random-samples", "2", "--transfer-models", "2", "--quiet"]) == 0
    cli = validate_results(json.loads((out / "results.json").read_text()))
    assert cli["table"] == res["table"] and cli["clean"] == res["clean"]  # the same seeds, the same numbers
