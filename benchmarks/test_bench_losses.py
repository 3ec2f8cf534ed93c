"""Fused CPU kernels vs the eager reference vs torch.compile(reference), forward + backward.

Each benchmark times one training-step use of a regularizer on a leaf tensor ``grads`` of shape
[B, n, D]: ``grads.grad = None; loss = f(grads); loss.backward()`` (``concentration_stats``: forward
only, under no_grad). Implementations:

- ``fused``:    the public API with ``backend='cpu'`` (the C++ kernels of fastdiv._C);
- ``eager``:    the public API with ``backend='torch'`` (plain PyTorch, fastdiv/reference.py);
- ``compiled``: ``torch.compile`` of the reference function (mean over the batch, like the public
  API's default reduction), compiled once per case with ``fullgraph=True, dynamic=False`` and warmed
  up outside the timed region.

Before timing, every case checks its result (loss and input gradient) against the eager reference,
so a broken kernel cannot post a good time.

Matrix (environment variables, read at collection):

- ``FASTDIV_BENCH_MATRIX=default`` (default): every op x 3 impls at the CIFAR-10 size in fp32;
  dpp_loss x 3 impls at every other size in fp32; dpp_loss x 3 impls at CIFAR-10 in bf16.
- ``FASTDIV_BENCH_MATRIX=full``: every op x every size x {fp32, bf16} x 3 impls.
- ``FASTDIV_BENCH_QUICK=1``: the same cases with the batch shrunk 32x (min 2), for smoke tests.
- Any subset with ``-k``, e.g. ``-k "dpp_loss and large"``.

Every benchmark stores in ``benchmark.extra_info`` the case (op, size, B, n, D, dtype, impl), bytes(X),
the minimal traffic (3 x bytes(X) forward + backward; 1 x bytes(X) for the forward-only
concentration_stats), GB/s against it from the median time, and % of the session's measured copy
bandwidth (see conftest.py for the convention). ``benchmarks/report.py`` turns the JSON into Markdown.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable, NamedTuple

import pytest
import torch

import fastdiv
from fastdiv import reference


class Op(NamedTuple):
    public: Callable           # fastdiv.<op>, called with backend=...
    reference: Callable        # fastdiv.reference.<op>: per-input values (or ConcentrationStats)
    backward: bool             # False: forward only, under no_grad (concentration_stats)


OPS: dict[str, Op] = {
    "dpp_loss": Op(fastdiv.dpp_loss, reference.dpp_loss, True),
    "mean_cosine_loss": Op(fastdiv.mean_cosine_loss, reference.mean_cosine_loss, True),
    "kappa_loss": Op(fastdiv.kappa_loss, reference.kappa_loss, True),
    "max_cosine_loss": Op(fastdiv.max_cosine_loss, reference.max_cosine_loss, True),
    "smoothmax_cosine_loss": Op(fastdiv.smoothmax_cosine_loss, reference.smoothmax_cosine_loss, True),
    "gal_loss": Op(fastdiv.gal_loss, reference.gal_loss, True),
    "mean_penalty": Op(fastdiv.mean_penalty, reference.mean_penalty, True),
    "variance_penalty": Op(fastdiv.variance_penalty, reference.variance_penalty, True),
    "sparsity_penalty": Op(fastdiv.sparsity_penalty, reference.sparsity_penalty, True),
    "concentration_stats": Op(fastdiv.concentration_stats, reference.concentration_stats, False),
}

#: (B, n, D) from the papers (docs/design.md §6); 'large' is the bandwidth-bound size (126 MB fp32).
SIZES: dict[str, tuple[int, int, int]] = {
    "mnist": (128, 3, 784),
    "cifar10": (128, 10, 3072),
    "stl10": (128, 3, 27648),
    "cifar10-n20": (128, 20, 3072),
    "large": (1024, 10, 3072),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("fused", "eager", "compiled")

QUICK = os.environ.get("FASTDIV_BENCH_QUICK", "").strip().lower() not in ("", "0", "false", "no", "off")
MATRIX = os.environ.get("FASTDIV_BENCH_MATRIX", "default").strip().lower()
if MATRIX not in ("default", "full"):
    raise ValueError(f"FASTDIV_BENCH_MATRIX must be 'default' or 'full', got {MATRIX!r}")

#: fp32: fused/compiled vs eager, |diff| <= RTOL * (|ref| + max|ref|) elementwise.
RTOL_FP32 = 1e-4
#: bf16: each impl vs an fp64 oracle on the same bf16 values; error at most BF16_SLACK x the eager
#: reference's own error, or BF16_FLOOR x max|oracle|, whichever is larger.
BF16_SLACK = 2.0
BF16_FLOOR = 1e-2
WARMUP_CALLS = 2


def shape_of(size: str) -> tuple[int, int, int]:
    b, n, d = SIZES[size]
    return (max(2, b // 32), n, d) if QUICK else (b, n, d)


def cases() -> list[tuple[str, str, str, str]]:
    """(size, dtype, op, impl), ordered so that cases sharing an input run back to back."""
    if MATRIX == "full":
        combos = [(s, t, o) for s in SIZES for t in DTYPES for o in OPS]
    else:
        combos = [("cifar10", "fp32", o) for o in OPS]
        combos += [(s, "fp32", "dpp_loss") for s in SIZES if s != "cifar10"]
        combos += [("cifar10", "bf16", "dpp_loss")]
    return [(s, t, o, i) for (s, t, o) in combos for i in IMPLS]


def make_grads(size: str, dtype: str) -> torch.Tensor:
    """Deterministic gradient-like data: a shared direction plus noise (cosines ~0.2, so no loss sits
    at a cancellation point) with row norms spread over [0.1, 2.1] (so the normalization matters)."""
    b, n, d = shape_of(size)
    gen = torch.Generator().manual_seed(1234)
    x = 0.5 * torch.randn(b, 1, d, generator=gen) + torch.randn(b, n, d, generator=gen)
    x.mul_(0.1 + 2.0 * torch.rand(b, n, 1, generator=gen))
    return x.to(DTYPES[dtype])


def eager_fn(op: str) -> Callable:
    return functools.partial(OPS[op].public, backend="torch")


def fused_fn(op: str) -> Callable:
    return functools.partial(OPS[op].public, backend="cpu")


def compiled_fn(op: str, fullgraph: bool = True) -> Callable:
    ref = OPS[op].reference
    torch._dynamo.reset()  # a fresh cache per case: no recompile limits, no stale graphs
    if OPS[op].backward:
        def f(g):
            return ref(g).mean()  # == the public API's reduction='mean'
    else:
        def f(g):
            return ref(g)
    return torch.compile(f, fullgraph=fullgraph, dynamic=False)


def run_once(op: str, f: Callable, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One call as timed; returns its outputs by name ('loss' and 'grad', or the stats fields)."""
    if OPS[op].backward:
        x.grad = None
        loss = f(x)
        loss.backward()
        return {"loss": loss.detach(), "grad": x.grad.detach().clone()}
    with torch.no_grad():
        return {k: v.detach() for k, v in f(x)._asdict().items()}


def timed_step(f: Callable, x: torch.Tensor, backward: bool) -> Callable[[], None]:
    """What one timed round runs: forward and backward of a loss, or the forward alone (no autograd)."""
    if backward:
        def step():
            x.grad = None
            f(x).backward()
    else:
        def step():
            with torch.no_grad():
                f(x)
    return step


def first_call(op: str, impl: str, f: Callable, x: torch.Tensor, extra: dict,
               sync: Callable[[], None] = lambda: None) -> tuple[Callable, dict[str, torch.Tensor]]:
    """The untimed first call of a case: (the function to time, its outputs). For impl 'compiled' it
    compiles forward and backward (time in extra['compile_s']); a reference that cannot compile with
    fullgraph=True (e.g. boolean-mask indexing has a data-dependent shape) is compiled with graph breaks
    instead, which is what a user calling torch.compile(reference) gets."""
    t0 = time.perf_counter()
    try:
        got = run_once(op, f, x)
    except torch._dynamo.exc.TorchDynamoException as exc:
        if impl != "compiled":
            raise
        f = compiled_fn(op, fullgraph=False)
        extra["compile"] = "torch.compile(reference, dynamic=False) with graph breaks"
        extra["fullgraph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        t0 = time.perf_counter()
        got = run_once(op, f, x)
    sync()
    if impl == "compiled":
        extra["compile_s"] = time.perf_counter() - t0
    return f, got


def per_input(op: str, x: torch.Tensor, backend: str) -> dict[str, torch.Tensor]:
    """The per-input values of a loss (reduction='none'): checked too, not only their mean."""
    if not OPS[op].backward:
        return {}
    with torch.no_grad():
        return {"per_input": OPS[op].public(x.detach(), backend=backend, reduction="none")}


@functools.lru_cache(maxsize=1)  # one case's input and references alive at a time
def case_data(size: str, dtype: str, op: str):
    """The input, the eager reference's outputs and, for half precision, an fp64 oracle's."""
    x = make_grads(size, dtype).requires_grad_(OPS[op].backward)
    return (x, *references(op, x))


def references(op: str, x: torch.Tensor):
    """(the eager reference's outputs on x, those of an fp64 oracle when x is not fp32, else None)."""
    eager = run_once(op, eager_fn(op), x) | per_input(op, x, "torch")
    oracle = None
    if x.dtype != torch.float32:
        x64 = x.detach().double().requires_grad_(OPS[op].backward)
        oracle = run_once(op, eager_fn(op), x64) | per_input(op, x64, "torch")
    return eager, oracle


def _scale(t: torch.Tensor) -> float:
    return max(t.double().abs().max().item(), 1e-30)


def check(op: str, dtype: str, impl: str, got: dict, eager: dict, oracle: dict | None) -> dict:
    """Asserts that every output in ``got`` matches the reference; returns the relative errors."""
    errors = {}
    for name, a in got.items():
        assert torch.isfinite(a).all(), f"{op}/{impl} {dtype}: non-finite {name}"
        e = eager[name].double()
        if oracle is None:  # fp32: elementwise against the eager reference
            err = (a.double() - e).abs()
            bound = RTOL_FP32 * (e.abs() + _scale(e))
            assert (err <= bound).all(), (
                f"{op}/{impl} {dtype}: {name} differs from the eager reference: max |diff| "
                f"{err.max().item():.3g}, max |ref| {_scale(e):.3g} (rtol {RTOL_FP32})")
            errors[name] = err.max().item() / _scale(e)
        else:  # half precision: against the fp64 oracle, relative to the eager reference's own error
            o = oracle[name].double()
            err, eager_err = (a.double() - o).abs().max().item(), (e - o).abs().max().item()
            bound = max(BF16_SLACK * eager_err, BF16_FLOOR * _scale(o))
            assert err <= bound, (
                f"{op}/{impl} {dtype}: {name} error vs the fp64 oracle {err:.3g} exceeds {bound:.3g} "
                f"(eager {dtype} error {eager_err:.3g}, max |oracle| {_scale(o):.3g})")
            errors[name] = err / _scale(o)
    return {f"rel_err_{k}": v for k, v in errors.items()}


def timing_extra(benchmark, traffic_bytes: int, copy: dict) -> dict:
    """GB/s and % of copy bandwidth from the median; absent when timing is disabled."""
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if not stats:
        return {}
    data = sorted(stats.data)
    pct = lambda q: data[min(len(data) - 1, int(q * (len(data) - 1) + 0.5))]  # noqa: E731
    gbps = traffic_bytes / stats.median / 1e9
    return {
        "median_s": stats.median,
        "p10_s": pct(0.10),
        "p90_s": pct(0.90),
        "GBps": gbps,
        "pct_of_copy": 100.0 * gbps / copy["copy_GBps"],
    }


@pytest.mark.parametrize("size,dtype,op,impl", cases(), ids=lambda v: v)
def test_bench(benchmark, copy_bandwidth, machine, size, dtype, op, impl):
    x, eager, oracle = case_data(size, dtype, op)
    b, n, d = x.shape
    extra = {
        "op": op, "size": size, "B": b, "n": n, "D": d, "dtype": dtype, "impl": impl,
        "quick": QUICK, "pass": "fwd+bwd" if OPS[op].backward else "fwd",
        "cpu": machine["cpu_model"], "threads": machine["threads"], "torch": machine["torch"],
        "copy_GBps": copy_bandwidth["copy_GBps"],
    }

    if impl == "fused":
        f = fused_fn(op)
    elif impl == "eager":
        f = eager_fn(op)
    else:
        f = compiled_fn(op)
        extra["compile"] = "torch.compile(reference, fullgraph=True, dynamic=False)"
    x = x.detach().requires_grad_(OPS[op].backward)  # a fresh leaf: no .grad from another impl

    f, got = first_call(op, impl, f, x, extra)
    if impl == "fused":
        got |= per_input(op, x, "cpu")
    extra.update(check(op, dtype, impl, got, eager, oracle))
    for _ in range(WARMUP_CALLS):
        run_once(op, f, x)

    bytes_x = x.numel() * x.element_size()
    factor = 3 if OPS[op].backward else 1
    extra.update(bytes_x=bytes_x, traffic_factor=factor, traffic_bytes=factor * bytes_x)

    benchmark.group = f"{op} {size} {dtype}"
    benchmark(timed_step(f, x, OPS[op].backward))
    extra.update(timing_extra(benchmark, factor * bytes_x, copy_bandwidth))
    benchmark.extra_info.update(extra)
