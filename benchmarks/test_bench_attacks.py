"""EOT-PGD on the GradDiv MNIST CNN with Bayesian layers: fastdiv's batched attack vs the
per-sample loop.

Case (GradDiv, Fig. 6 settings): EOT-PGD with n = 10 sample models per step, m = 20 steps,
α = ε/4, ε = 0.1, B = 128 images of 1x28x28, on ``build_model('graddiv-mnist', kind='bayes')`` (every
conv and linear layer Bayesian) with weights from a short training on sklearn's digits resized to
28x28 (no download; see the ``trained`` fixture; the robust accuracies then mean something).
Implementations:

- ``fastdiv-batched``: ``fastdiv.attacks.PGD(eot='mean', eot_samples=10, strategy='batched')``: one
  forward + backward over the 10x replicated batch per step (grouped convolutions / batched matmuls
  over the 10 weight draws), one fused ``eot_step``;
- ``fastdiv-loop``: the same attack with ``strategy='loop'`` (10 seeded forwards + backwards per step;
  what ``strategy='auto'`` picks on the CPU; on CUDA 'auto' is batched);
- ``loop``: torchattacks' EOTPGD algorithm written out (10 forwards + backwards per step with fresh
  global-RNG weight draws, summed gradient, sign step, projection): the per-sample loop every public
  EOT implementation uses.

Each timed call is one whole attack (20 steps). After timing, every impl's adversarial batch is
scored with the same 20-sample ensemble prediction (mean softmax, fixed seed); the robust accuracy
and its binomial standard error are stored in ``extra_info``. Run:

    python -m pytest benchmarks/test_bench_attacks.py -q --benchmark-only --benchmark-json=.benchmarks/attacks.json

Environment: ``FASTDIV_BENCH_QUICK=1`` shrinks B to 4 and the training to a few batches (smoke test);
``FASTDIV_BENCH_ATTACK_ROUNDS`` (default 1) rounds per impl; ``FASTDIV_BENCH_ATTACK_EPS`` (default 0.1);
``FASTDIV_BENCH_ATTACK_STEP_REPEATS`` (default 5) alternations of the interleaved step benchmark;
``FASTDIV_BENCH_DEVICE`` (default cpu; 'cuda' times on the GPU with a synchronize after each call).
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch
from torch import nn

import fastdiv
from fastdiv.attacks import PGD
from fastdiv.nn import build_model, sampling

from test_bench_losses import QUICK

N_SAMPLES, STEPS = 10, 20
BATCH = 4 if QUICK else 128
EPS = float(os.environ.get("FASTDIV_BENCH_ATTACK_EPS", "0.1"))
ALPHA = EPS / 4
ROUNDS = int(os.environ.get("FASTDIV_BENCH_ATTACK_ROUNDS", "1"))
DEVICE = torch.device(os.environ.get("FASTDIV_BENCH_DEVICE", "cpu"))
EVAL_SAMPLES = 20
IMPLS = ("fastdiv-batched", "fastdiv-loop", "loop")


def eot_pgd_loop(model, x, y, eps, alpha, steps, n):
    """torchattacks.EOTPGD (v3.5.1) as it reads: n forwards/backwards per step, fresh draws each."""
    loss = nn.CrossEntropyLoss()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1).detach()
    for _ in range(steps):
        grad = torch.zeros_like(x_adv)
        x_adv.requires_grad_(True)
        for _ in range(n):
            grad += torch.autograd.grad(loss(model(x_adv), y), x_adv)[0]
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1).detach()
    return x_adv


@pytest.fixture(scope="module")
def trained():
    """(model, x [B,1,28,28], y [B], train_seconds): the Bayesian GradDiv MNIST CNN as a stand-in for
    an Adv-BNN: the deterministic architecture trained for 2 epochs on digits at 28x28 (Adam 1e-3,
    batch 64), its weights copied into the Bayesian layers' means and every posterior standard
    deviation set to the layer's mean |weight| (~94% ensemble / ~90% single-sample test accuracy).
    Training the Bayesian net from scratch at sigma0 = 0.05 stays at chance for several epochs (the
    weight noise of the 6272-input layer swamps its signal), and the timings do not depend on the
    weights; the robust accuracies need a model that is right on clean inputs."""
    from fastdiv.data import load_dataset
    from fastdiv.nn.bayes import BayesianLayer

    splits = load_dataset("digits", resize=28, seed=0)
    xs, ys = splits.train.tensors
    t0 = time.perf_counter()
    torch.manual_seed(0)
    det = build_model("graddiv-mnist", kind="deterministic", in_shape=(1, 28, 28))
    opt = torch.optim.Adam(det.parameters(), lr=1e-3)
    epochs, limit = (1, 4 * 64) if QUICK else (2, len(xs))
    for _ in range(epochs):
        perm = torch.randperm(len(xs))[:limit]
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(det(xs[idx]), ys[idx]).backward()
            opt.step()
    model = build_model("graddiv-mnist", kind="bayes", in_shape=(1, 28, 28), sigma0=0.05)
    plain = [m for m in det.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    bayes = [m for m in model.modules() if isinstance(m, BayesianLayer)]
    assert len(plain) == len(bayes)
    with torch.no_grad():
        for d, b in zip(plain, bayes):
            sigma = d.weight.abs().mean().item()
            b.weight_mu.copy_(d.weight)
            b.bias_mu.copy_(d.bias)
            b.weight_log_sigma.fill_(math.log(sigma))
            b.bias_log_sigma.fill_(math.log(sigma))
    model.eval().requires_grad_(False).to(DEVICE)
    x, y = splits.test.tensors
    return model, x[:BATCH].to(DEVICE), y[:BATCH].to(DEVICE), time.perf_counter() - t0


def synced(f):
    """``f`` followed by a CUDA synchronize, so that the timing covers the queued kernels."""
    def run(*args):
        out = f(*args)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    return run


def ensemble_accuracy(model, x, y, seed=12345):
    with torch.no_grad(), sampling(model, EVAL_SAMPLES, seed):
        logits = model(x.repeat(EVAL_SAMPLES, 1, 1, 1)).view(EVAL_SAMPLES, x.shape[0], -1)
    return (logits.softmax(-1).mean(0).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_eot_pgd(benchmark, machine, trained, impl):
    model, x, y, train_s = trained
    if impl == "loop":
        torch.manual_seed(0)
        f = lambda: eot_pgd_loop(model, x, y, EPS, ALPHA, STEPS, N_SAMPLES)
    else:
        atk = PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, eot="mean", eot_samples=N_SAMPLES, seed=0,
                  strategy=impl.split("-")[1])
        f = lambda: atk(x, y)
    x_adv = benchmark.pedantic(synced(f), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    clean, robust = ensemble_accuracy(model, x, y), ensemble_accuracy(model, x_adv, y)
    benchmark.extra_info.update({
        "op": "EOT-PGD", "model": "graddiv-mnist bayes", "B": BATCH, "n": N_SAMPLES, "steps": STEPS,
        "eps": EPS, "alpha": ALPHA, "impl": impl, "quick": QUICK, "rounds": ROUNDS,
        "clean_acc": clean, "robust_acc": robust, "robust_acc_se": math.sqrt(max(robust * (1 - robust), 1e-4) / BATCH),
        "eval_samples": EVAL_SAMPLES, "train_s": train_s, "device": str(DEVICE),
        "cpu": machine["cpu_model"], "threads": machine["threads"], "torch": machine["torch"],
        "eot_backend": fastdiv.default_backend(x.device.type),
    })
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats:
        benchmark.extra_info.update({"median_s": stats.median, "min_s": stats.min, "max_s": stats.max})


STEP_REPEATS = 2 if QUICK else int(os.environ.get("FASTDIV_BENCH_ATTACK_STEP_REPEATS", "5"))


def test_bench_eot_step_interleaved(benchmark, machine, trained):
    """One EOT step's n = 10 input gradients (the attack's cost: the step itself is negligible) by
    each impl, the impls alternated ``STEP_REPEATS`` times, so that a machine shared with other work
    slows them alike; per-impl medians and minima go to ``extra_info`` (the timed call is the whole
    interleaved loop)."""
    model, x, y, _ = trained
    loss = nn.CrossEntropyLoss()

    def loop_grads():
        grad, leaf = torch.zeros_like(x), x.clone().requires_grad_(True)
        for _ in range(N_SAMPLES):
            grad += torch.autograd.grad(loss(model(leaf), y), leaf)[0]
        return grad

    impls = {
        "fastdiv-batched": lambda s: fastdiv.sample_input_grads(model, x, y, N_SAMPLES, strategy="batched",
                                                                generator=s),
        "fastdiv-loop": lambda s: fastdiv.sample_input_grads(model, x, y, N_SAMPLES, strategy="loop", generator=s),
        "loop": lambda s: loop_grads(),
    }
    impls = {k: synced(f) for k, f in impls.items()}
    times = {k: [] for k in impls}

    def interleaved():
        for rep in range(STEP_REPEATS):
            for name, f in impls.items():
                t0 = time.perf_counter()
                f(rep)
                times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(interleaved, rounds=1, iterations=1, warmup_rounds=0)
    info = {"op": "EOT step gradients (interleaved)", "model": "graddiv-mnist bayes", "B": BATCH, "n": N_SAMPLES,
            "repeats": STEP_REPEATS, "impl": "interleaved", "quick": QUICK,
            "cpu": machine["cpu_model"], "threads": machine["threads"], "torch": machine["torch"]}
    for name, ts in times.items():
        ts = sorted(ts)
        info[f"{name}_median_s"] = ts[len(ts) // 2]
        info[f"{name}_min_s"] = ts[0]
        info[f"{name}_all_s"] = [round(t, 4) for t in times[name]]
    benchmark.extra_info.update(info)
