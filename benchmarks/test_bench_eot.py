"""Benchmarks of the fused EOT step (fastdiv.eot_step): fused vs the eager reference vs
torch.compile(reference), at the papers' attack sizes (B = 128, n = 10 sample gradients).

Traffic floor per step: read the n gradients, x and x0, write x_new: (n + 3) x bytes(x); with MI-FGSM
momentum also read and write the fp32 buffer. Run with the loss benchmarks:

    python -m pytest benchmarks -q --benchmark-only -k eot
"""
from __future__ import annotations

import pytest
import torch

import fastdiv
from fastdiv import reference

from test_bench_losses import QUICK, timing_extra

SIZES = {"mnist": (128, 10, (1, 28, 28)), "cifar10": (128, 10, (3, 32, 32))}
VARIANTS = {"linf": dict(norm="linf"), "l2": dict(norm="l2"), "mifgsm": dict(norm="linf", momentum=True)}
IMPLS = ("fused", "eager", "compiled")


def make_case(size: str, variant: str):
    b, n, feat = SIZES[size]
    if QUICK:
        b = max(2, b // 32)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(b, *feat, generator=gen)
    x = (x0 + 0.01 * torch.randn(b, *feat, generator=gen)).clamp(0, 1)
    grads = torch.randn(n, b, *feat, generator=gen)
    kw = dict(alpha=2 / 255, eps=8 / 255, norm=VARIANTS[variant]["norm"])
    if VARIANTS[variant].get("momentum"):
        kw["momentum"] = torch.randn(b, *feat, generator=gen)
    return x, x0, grads, kw


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("size", list(SIZES))
def test_bench_eot(benchmark, copy_bandwidth, machine, size, variant, impl):
    x, x0, grads, kw = make_case(size, variant)
    if impl == "fused":
        f = lambda: fastdiv.eot_step(x, x0, grads, backend="cpu", **kw)  # noqa: E731
    elif impl == "eager":
        f = lambda: reference.eot_step(x, x0, grads, **kw)  # noqa: E731
    else:
        compiled = torch.compile(reference.eot_step, fullgraph=True, dynamic=False)
        f = lambda: compiled(x, x0, grads, **kw)  # noqa: E731
    got, want = f(), reference.eot_step(x, x0, grads, **kw)  # also warms up / compiles
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        # l_inf steps are exact up to sign ties of a near-zero mean gradient; allow a few elements
        mismatch = ((g - w).abs() > 1e-5 * max(1.0, w.abs().max().item())).float().mean().item()
        assert mismatch < 1e-4, f"{impl} eot_step {variant}: {mismatch:.2%} of elements differ from the reference"
    n = grads.shape[0]
    traffic = (n + 3) * x.numel() * x.element_size()
    if "momentum" in kw:
        traffic += 2 * kw["momentum"].numel() * 4
    benchmark.extra_info.update({
        "op": f"eot_step {variant}", "size": size, "B": x.shape[0], "n": n, "D": x[0].numel(), "dtype": "fp32",
        "impl": impl, "quick": QUICK, "pass": "step", "traffic_bytes": traffic,
        "cpu": machine["cpu_model"], "threads": machine["threads"], "torch": machine["torch"],
        "copy_GBps": copy_bandwidth["copy_GBps"],
    })
    benchmark(f)
    benchmark.extra_info.update(timing_extra(benchmark, traffic, copy_bandwidth))
