"""Training-step benchmark: GradDiv-DPP on the GradDiv MNIST CNN (Bayesian, 28x28 input), B = 128, n = 3.

One optimizer step of ``CE averaged over the n samples + lambda * R_DPP + kl_factor * KL / N`` (what
``fastdiv train --preset graddiv-dpp --dataset mnist`` does per batch, without the PGD examples, which
are the same work in both implementations):

- ``fastdiv``: :func:`fastdiv.sample_input_grads` (the n weight draws in one sample-batched forward
  and backward, ``create_graph=True``) + the fused :func:`fastdiv.dpp_loss` on ``[n, B, D]``;
- ``fastdiv-loop``: the same with ``strategy='loop'`` (n forwards/backwards inside fastdiv, fused loss):
  separates the sample batching from the fused loss;
- ``loop``: the plain implementation: n forwards of the model (fresh weight draws each), n input
  gradients with ``torch.autograd.grad(..., create_graph=True)``, stacked, and the plain-PyTorch
  ``fastdiv.reference.dpp_loss``.

Before timing, both are checked to compute the same loss and parameter gradients for the same draws
(the loop run under ``fastdiv.nn.sampling(model, n, seed, index=s)``). Run:

    python -m pytest benchmarks/test_bench_train.py -q --benchmark-only
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import fastdiv
from fastdiv import reference
from fastdiv.nn import build_model, kl_divergence, sampling

B, N, SHAPE, LAM, KL_FACTOR, N_TRAIN = 128, 3, (1, 28, 28), 1.0, 0.02, 55000
ROUNDS = int(os.environ.get("FASTDIV_BENCH_TRAIN_ROUNDS", "5"))
IMPLS = ("fastdiv", "fastdiv-loop", "loop")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _setup(device):
    torch.manual_seed(0)
    model = build_model("graddiv-mnist", in_shape=SHAPE, kind="bayes", sigma0=0.05).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(B, *SHAPE, generator=gen).to(device)
    y = torch.randint(0, 10, (B,), generator=gen).to(device)
    return model, x, y


def fastdiv_loss(model, x, y, seed=None, strategy="batched"):
    grads, logits = fastdiv.sample_input_grads(model, x, y, N, create_graph=True, generator=seed, strategy=strategy)
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(N))
    reg = fastdiv.dpp_loss(grads, sample_dim=0)
    return ce + LAM * reg + KL_FACTOR * kl_divergence(model) / N_TRAIN


def loop_loss(model, x, y, seed=None):
    """The plain loop; ``seed`` pins the draws to fastdiv's (correctness check only)."""
    grads, ces = [], []
    for s in range(N):
        ctx = sampling(model, N, seed, index=s) if seed is not None else _nullcontext()
        with ctx:
            leaf = x.detach().requires_grad_(True)
            logits = model(leaf)
            ce = F.cross_entropy(logits, y, reduction="none")
            (g,) = torch.autograd.grad(ce.sum(), leaf, create_graph=True)
        grads.append(g.flatten(1))
        ces.append(ce.mean())
    reg = reference.dpp_loss(torch.stack(grads, dim=1)).mean()  # [B, n, D]
    return torch.stack(ces).mean() + LAM * reg + KL_FACTOR * kl_divergence(model) / N_TRAIN


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def fastdiv_loop_loss(model, x, y, seed=None):
    return fastdiv_loss(model, x, y, seed, strategy="loop")


LOSSES = {"fastdiv": fastdiv_loss, "fastdiv-loop": fastdiv_loop_loss, "loop": loop_loss}


def _param_grads(model, loss_fn, x, y, seed):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, x, y, seed)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_train_step(benchmark, impl):
    device = _device()
    model, x, y = _setup(device)
    # correctness gate: same draws -> same loss and parameter gradients
    ref_model = copy.deepcopy(model)
    l_fast, g_fast = _param_grads(model, LOSSES[impl] if impl != "loop" else fastdiv_loss, x, y, 123)
    l_loop, g_loop = _param_grads(ref_model, loop_loss, x, y, 123)
    torch.testing.assert_close(l_fast, l_loop, rtol=1e-4, atol=1e-5)
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(g_fast, g_loop))
    assert worst < 1e-3, f"parameter gradients differ from the loop's by {worst:.2e} (relative to max)"

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = LOSSES[impl]

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()
        opt.step()
        _sync(device)

    benchmark.extra_info.update({
        "op": "train step graddiv-dpp", "model": "graddiv-mnist (bayes)", "B": B, "n": N, "shape": list(SHAPE),
        "impl": impl, "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "grad_rel_err": worst,
    })
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
