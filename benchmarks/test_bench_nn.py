"""Sample-batched vs looped input gradients of n sample models (fastdiv.sample_input_grads).

Timed call: ``fastdiv.sample_input_grads(model, x, y, n=10, strategy=...)`` at B = 128 on MNIST-sized
input (1, 28, 28): one forward + one input-gradient backward per sample model. Models:

- ``graddiv-mnist-bayes``: the GradDiv MNIST CNN with every layer Bayesian (Adv-BNN, sigma0 = 0.05;
  6.7M weights, every sample model draws all of them);
- ``conv3-ensemble5``: a 5-member ensemble of GAL's Conv-3 (fastdiv.nn.Ensemble), n = 10 samples =
  each member twice.

Strategies: ``batched`` (one replicated forward/backward), ``loop`` (n forwards/backwards, the
reference; under the sampling protocol each loop step draws the noise of all n samples and keeps
one, so its noise generation grows as n^2), and for the Bayesian net ``naive``: n plain forwards
outside any sampling context, each drawing one fresh weight sample from the global RNG (what an
Adv-BNN training script does), with ``torch.autograd.grad`` to the input — the fairest loop baseline.

Before timing, ``batched`` is checked against ``loop`` (same gradients for the same seed).
Devices: cpu always; cuda when a GPU is present (synchronized inside the timed call).

    python -m pytest benchmarks/test_bench_nn.py -q --benchmark-only --benchmark-min-rounds=3
"""
from __future__ import annotations

import pytest
import torch

import fastdiv
from fastdiv.nn import Ensemble, build_model

from test_bench_losses import QUICK

N_SAMPLES = 10
BATCH = 4 if QUICK else 128
SHAPE = (1, 28, 28)
MODELS = ("graddiv-mnist-bayes", "conv3-ensemble5")
STRATEGIES = ("batched", "loop", "naive")
DEVICES = ("cpu", "cuda")


def make_model(name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "graddiv-mnist-bayes":
        model = build_model("graddiv-mnist", in_shape=SHAPE, kind="bayes", sigma0=0.05)
    else:
        model = Ensemble([build_model("conv3", in_shape=SHAPE) for _ in range(5)])
    return model.to(device).eval()


def naive_grads(model, x, y, n):
    """n one-sample forwards with fresh global-RNG draws, each with its own input-gradient backward."""
    grads = []
    for _ in range(n):
        leaf = x.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(leaf), y, reduction="sum")
        grads.append(torch.autograd.grad(loss, leaf)[0])
    return torch.stack(grads)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", MODELS)
def test_bench_sample_grads(benchmark, machine, name, strategy, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if strategy == "naive" and name != "graddiv-mnist-bayes":
        pytest.skip("naive fresh-draw loop applies to the Bayesian net only (an ensemble has no draws)")
    model = make_model(name, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(BATCH, *SHAPE, generator=gen).to(device)
    y = torch.randint(0, 10, (BATCH,), generator=gen).to(device)
    if strategy == "batched":
        got, _ = fastdiv.sample_input_grads(model, x, y, N_SAMPLES, strategy="batched", generator=7)
        want, _ = fastdiv.sample_input_grads(model, x, y, N_SAMPLES, strategy="loop", generator=7)
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-4 * scale, f"{name}: batched gradients differ from the loop"

    if strategy == "naive":
        def f():
            out = naive_grads(model, x, y, N_SAMPLES)
            _sync(device)
            return out
    else:
        def f():
            out = fastdiv.sample_input_grads(model, x, y, N_SAMPLES, strategy=strategy, generator=7)
            _sync(device)
            return out

    benchmark.extra_info.update({
        "op": "sample_input_grads", "model": name, "strategy": strategy, "device": device, "B": BATCH,
        "n": N_SAMPLES, "shape": list(SHAPE), "quick": QUICK, "pass": "fwd+input-grad bwd",
        "cpu": machine["cpu_model"], "threads": machine["threads"], "torch": machine["torch"],
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    })
    benchmark(f)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats:
        benchmark.extra_info["median_s"] = stats.median
