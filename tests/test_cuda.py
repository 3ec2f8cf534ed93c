"""GPU tests: every public op on CUDA tensors, on both GPU backends ('cuda': the CUDA kernels of
fastdiv._C; 'triton': the compiled Triton kernels of fastdiv/triton), against the float64 reference
(fastdiv/reference.py) and the C++ CPU kernels.

Run alone on a GPU machine, both backends:

    TRITON_INTERPRET=0 python -m pytest tests/test_cuda.py -q

Everything here is marked ``gpu`` and skips without a CUDA device. Per backend: 'cuda' needs fastdiv._C
built with its CUDA kernels (``fastdiv.cuda_built()``); 'triton' needs triton and Triton's interpreter
off. tests/conftest.py turns the interpreter on for the whole session (the CPU tests of the Triton
kernels need it, and triton reads it once, when the kernels are defined), so a plain
``python -m pytest tests/test_cuda.py -q`` runs the 'cuda' cases and skips the 'triton' ones, saying why.
Every parametrized test id starts with its backend: ``-k triton`` selects the Triton kernels,
``-k "not triton"`` the CUDA kernels (with the launch-count and info tests).

What is covered, per backend: every loss and head, normalize, cosine_gram and the concentration
statistics, forward and backward, against the fp64 reference (fp32/bf16/fp16/fp64; n from 2 to 40, past
the single-launch tile n <= 32; D = 1, 7, 3072); strided B and n dims, misaligned rows and
sample_dim=0, without a copy (checked with torch.profiler); B = 0; zero, duplicate and aligned rows;
NaN/Inf inputs as on CPU; bitwise determinism; float64 gradcheck; torch.library.opcheck of every op;
torch.compile(fullgraph=True); the raw ops and eot_step against the CPU kernels; and, for the CUDA
kernels, the launch counts of the issue (one kernel forward, one backward for n <= 32).

Tolerances are the CPU suite's (tests/conftest.py): in fp64 the kernels agree with the reference to
~1e-9; in fp32/bf16/fp16 a kernel may be at most about as wrong as the reference evaluated in that
precision (``assert_parity``). Raw-op comparisons with the CPU kernels use test_triton.py's tolerances.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch.library import opcheck

import fastdiv
from fastdiv import reference
from fastdiv._backend import cuda_built, extension_built, triton_installed, triton_interpreted
from fastdiv.eot import eot_step
from fastdiv.ops.schemas import NAMESPACES, SCHEMAS
from fastdiv.profiling import gpu_work

from conftest import (
    LOSS_BY_ID,
    LOSS_CASES,
    LOSS_IDS,
    STAT_FIELDS,
    assert_close64,
    assert_parity,
    dtype_id,
    randn,
    upstream_weights,
    value_and_grad,
)
from test_eot import EPS8, assert_out_close, momentum_like
from test_eot import make as make_eot
from test_losses import (
    DEGENERATE,
    FP16_BELOW_FLOOR,
    GRADCHECK_LAYOUTS,
    GRADCHECK_PARAMS,
    HYPER,
    LAYOUTS,
    NONFINITE,
    as_batch_first,
    assert_degenerate_finite,
    assert_empty_batch_ops,
    degenerate,
    loss_fn,
    max_subgradient_ambiguous,
)
from test_ops import EPS, HEADS, JITTER, RHO_MAX

DEVICE = "cuda"
HAS_GPU = torch.cuda.is_available()


def sync() -> None:
    torch.cuda.synchronize()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")]


def _triton_skip_reason() -> str | None:
    if not triton_installed():
        return "triton is not installed"
    if triton_interpreted():
        return ("Triton's interpreter is on (TRITON_INTERPRET=1, tests/conftest.py's default): run "
                "TRITON_INTERPRET=0 python -m pytest tests/test_cuda.py to test the compiled Triton kernels")
    return None


NO_CUDA_KERNELS = "fastdiv._C has no CUDA kernels (build it with a CUDA toolkit and a CUDA build of torch)"
# (conditioned on HAS_GPU: without a GPU the module's "needs a CUDA device" is the reason shown)
needs_cuda_kernels = pytest.mark.skipif(HAS_GPU and not cuda_built(), reason=NO_CUDA_KERNELS)
GPU_BACKENDS = [
    pytest.param("cuda", marks=needs_cuda_kernels, id="cuda"),
    pytest.param("triton", marks=pytest.mark.skipif(HAS_GPU and _triton_skip_reason() is not None,
                                                    reason=_triton_skip_reason() or ""), id="triton"),
]
#: what "as on CPU" compares with: the C++ CPU kernels, or the reference where they are not built
CPU_BACKEND = "cpu" if extension_built() else "torch"

ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
#: (rtol, atol relative to max(1, max |expected|)) of the CPU-kernel comparisons (as tests/test_triton.py):
#: outputs in the accumulation dtype, and outputs in the input's dtype (one or two ulps in half precision)
ACC_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 2e-6)}
OUT_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 2e-6), torch.float16: (2e-3, 1e-3),
           torch.bfloat16: (1.6e-2, 8e-3)}


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def on_device(fn):
    """``fn`` run on a GPU copy of its CPU argument, with the result moved back to the CPU. Both moves are
    differentiable, so conftest's CPU helpers (value_and_grad) drive GPU ops unchanged."""
    return lambda t: fn(t.to(DEVICE)).cpu()


def gpu_randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A standard normal tensor made on the GPU (the large inputs: no CPU generation and copy)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    base = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(*shape, generator=gen, device=DEVICE, dtype=base).to(dtype)


def close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], what: str) -> None:
    """Same shape and dtype, values within (rtol, atol * max(1, max |expected|)), NaN where NaN."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    finite = torch.isfinite(expected)
    scale = max(1.0, expected.double()[finite].abs().max().item()) if finite.any() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol[0], atol=tol[1] * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# =====================================================================================================
# 1. every loss against the float64 reference: dtypes, n, D, batch and row lengths, hyperparameters
# =====================================================================================================


def check_loss(case, backend: str, x64: torch.Tensor, dtypes, **kw) -> None:
    """Per-input values and the input gradient (distinct upstream weight per input) of ``case`` on the
    GPU against the reference on the CPU: fp64 to ~1e-9, other dtypes by the parity rule."""
    w = upstream_weights(x64.shape[0])
    truth = value_and_grad(loss_fn(case, "torch", **kw), x64, w)
    for dtype in dtypes:
        xl = x64.to(dtype)
        got = value_and_grad(on_device(loss_fn(case, backend, **kw)), xl, w)
        what = f"{case.id} on {backend}, {dtype_id(dtype)}"
        if dtype == torch.float64:
            assert_close64(got[0], truth[0], f"{what} value")
            assert_close64(got[1], truth[1], f"{what} gradient", rtol=1e-8)
        else:
            ref = value_and_grad(loss_fn(case, "torch", **kw), xl, w)
            assert_parity(got[0], ref[0], truth[0], dtype, f"{what} value")
            assert_parity(got[1], ref[1], truth[1], dtype, f"{what} gradient")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_losses_every_dtype(backend, case, dtype):
    """The CIFAR-10 size: n = 10 gradients of D = 3072."""
    check_loss(case, backend, randn(3, 10, 3072, seed=1), [dtype])


#: 33 and 40 are past the single-launch tile of the CUDA kernels (n <= 32): the two-launch fallback
N_VALUES = [2, 3, 10, 17, 32, 33, 40]


@pytest.mark.parametrize("n", N_VALUES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_losses_number_of_samples(backend, case, n):
    check_loss(case, backend, randn(3, n, 3072, seed=n), [torch.float64, torch.float32, torch.bfloat16])


def check_dpp_rank_one(backend: str, x64: torch.Tensor) -> None:
    """R_DPP of linearly dependent rows (D = 1): exact in fp64; in fp32 the true gradient 0 is a
    cancellation of ~1/jitter-sized terms, so the error bound is the conditioning one of
    tests/test_losses.py (check_dpp_rank_one_fp32)."""
    case = LOSS_BY_ID["dpp"]
    check_loss(case, backend, x64, [torch.float64])
    w = upstream_weights(x64.shape[0])
    truth = value_and_grad(loss_fn(case, "torch"), x64, w)
    x32 = x64.float()
    got = value_and_grad(on_device(loss_fn(case, backend)), x32, w)
    assert_parity(got[0], value_and_grad(loss_fn(case, "torch"), x32, w)[0], truth[0], torch.float32, "dpp fp32 value")
    bound = 100 * torch.finfo(torch.float32).eps / 1e-4 / x64.abs() * w.abs().max()
    err = (got[1] - truth[1]).abs()
    assert (err <= bound).all(), f"dpp fp32 gradient error {err.max():.3e} above the bound {bound.min():.3e}"


@pytest.mark.parametrize("d", [1, 7, 3072], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_losses_feature_dim(backend, case, d):
    x64 = randn(5, 3, d, seed=d)
    if case.id == "dpp" and d == 1:
        check_dpp_rank_one(backend, x64)
        return
    check_loss(case, backend, x64, [torch.float64, torch.float32, torch.float16])


@pytest.mark.parametrize("shape", [(300, 10, 200), (2, 3, 100_003)], ids=["B300", "D100003"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_losses_grid_shapes(backend, case, shape):
    """More inputs than a GPU has multiprocessors, and rows long enough to be split across blocks."""
    check_loss(case, backend, randn(*shape, seed=2), [torch.float64, torch.float32])


@pytest.mark.parametrize("case_id,kw", HYPER, ids=[f"{c}-{kw}" for c, kw in HYPER])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_losses_hyperparameters(backend, case_id, kw):
    x = randn(4, 5, 6, seed=104)
    x[:, 1] *= 0.1  # below eps=0.5 for the eps cases
    check_loss(LOSS_BY_ID[case_id], backend, x, [torch.float64, torch.float32], **kw)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_normalize_cosine_gram_stats(backend, dtype):
    x64 = randn(4, 10, 3, 32, 32, seed=7)  # multi-dim features, D = 3072
    xl = x64.to(dtype)
    for name, fn in (("normalize", fastdiv.normalize), ("cosine_gram", fastdiv.cosine_gram)):
        out_shape = fn(x64[:1], backend="torch").shape[1:]
        gen = torch.Generator().manual_seed(3)
        w = torch.rand((4,) + tuple(out_shape), generator=gen, dtype=torch.float64) + 0.5
        truth = value_and_grad(lambda t: fn(t, backend="torch"), x64, w)
        got = value_and_grad(on_device(lambda t: fn(t, backend=backend)), xl, w)
        if dtype == torch.float64:
            assert_close64(got[0], truth[0], f"{name} value")
            assert_close64(got[1], truth[1], f"{name} gradient", rtol=1e-8)
        else:
            ref = value_and_grad(lambda t: fn(t, backend="torch"), xl, w)
            assert_parity(got[0], ref[0], truth[0], dtype, f"{name} value")
            assert_parity(got[1], ref[1], truth[1], dtype, f"{name} gradient")
    for q in (1.0, 2.0, 3.0, math.inf):
        truth = fastdiv.concentration_stats(x64, q=q, backend="torch")
        got = fastdiv.concentration_stats(xl.to(DEVICE), q=q, backend=backend)
        ref = fastdiv.concentration_stats(xl, q=q, backend="torch")
        for field in STAT_FIELDS:
            g = getattr(got, field)
            assert g.device.type == torch.device(DEVICE).type and g.dtype == acc_of(dtype) and not g.requires_grad
            if dtype == torch.float64:
                assert_close64(g.cpu(), getattr(truth, field), f"{field} (q={q})")
            else:
                assert_parity(g.cpu(), getattr(ref, field), getattr(truth, field), dtype, f"{field} (q={q})")


# =====================================================================================================
# 2. the public API on the GPU against the C++ CPU kernels on the same data
# =====================================================================================================


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_public_api_matches_cpu_backend(backend, dtype):
    x = randn(8, 10, 3, 32, 32, seed=5).to(dtype)
    w = upstream_weights(8)
    for case in LOSS_CASES:
        got = value_and_grad(on_device(loss_fn(case, backend)), x, w)
        want = value_and_grad(loss_fn(case, CPU_BACKEND), x, w)
        close(got[0], want[0], ACC_TOL[acc_of(dtype)], f"{case.id} value")
        # the gradient is stored in x's dtype (the double() of value_and_grad is exact)
        close(got[1], want[1], OUT_TOL[dtype], f"{case.id} gradient")
    xd = x.to(DEVICE)
    for q in (1.0, 2.0, math.inf):
        got = fastdiv.concentration_stats(xd, q=q, backend=backend)
        want = fastdiv.concentration_stats(x, q=q, backend=CPU_BACKEND)
        for field in STAT_FIELDS:
            close(getattr(got, field), getattr(want, field), ACC_TOL[acc_of(dtype)], f"{field} (q={q})")
    close(fastdiv.normalize(xd, backend=backend), fastdiv.normalize(x, backend=CPU_BACKEND), OUT_TOL[dtype],
          "normalize")
    close(fastdiv.cosine_gram(xd, backend=backend), fastdiv.cosine_gram(x, backend=CPU_BACKEND), ACC_TOL[acc_of(dtype)],
          "cosine_gram")


def _op_results(ops, x: torch.Tensor, extras: dict) -> dict:
    """Every raw op of one namespace on x (and the coefficient tensors of ``extras``), by name."""
    e = extras
    out = {
        "gram": ops.gram(x, True),
        "gram_pullback": ops.gram_pullback(x, e["a"], e["beta"]),
        "gram_pullback-no-beta": ops.gram_pullback(x, e["a"], None),
        "gram_pullback-scale": ops.gram_pullback(x, e["a"], e["beta"], e["scale"]),
        # a stride-0 scale: what loss.sum().backward() hands the pullback
        "gram_pullback-expanded-scale": ops.gram_pullback(x, e["a"], None, e["scale"][:1].expand(x.shape[0])),
        "concentration_stats-q3": ops.concentration_stats(x, 3.0, EPS, JITTER, RHO_MAX),
        "concentration_stats-qinf": ops.concentration_stats(x, math.inf, EPS, JITTER, RHO_MAX),
        "normalize": ops.normalize(x, EPS),
        "normalize_pullback": ops.normalize_pullback(x, e["g"], EPS),
        "column_stats": ops.column_stats(x, EPS),
        "column_stats_pullback": ops.column_stats_pullback(x, e["r"], e["mean"], e["gr"], e["gm"], e["gv"], EPS),
        "column_stats_pullback-var-only": ops.column_stats_pullback(x, e["r"], e["mean"], None, None, e["gv"], EPS),
    }
    for head in HEADS:
        out[head] = ops.gram_loss(x, head, EPS, JITTER, 0.0, RHO_MAX)
    out["kappa-p-clamped"] = ops.gram_loss(x, "kappa", EPS, JITTER, 2.5, 0.05)
    return out


def _op_extras(x: torch.Tensor, seed: int = 4) -> dict:
    """Coefficients and upstream gradients for the raw ops on x, on the CPU (r and mean from the CPU op)."""
    b, n, d = x.shape
    acc = acc_of(x.dtype)
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, dtype=acc: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    r, mean, _ = torch.ops.fastdiv.column_stats(x, EPS)
    return {"a": rnd(b, n, n), "beta": rnd(b, n), "scale": rnd(b), "g": rnd(b, n, d, dtype=x.dtype), "r": r,
            "mean": mean, "gr": rnd(b, n), "gm": rnd(b, d), "gv": rnd(b, d)}


OP_SHAPES = [(3, 2, 7), (3, 7, 100), (4, 10, 3072), (2, 33, 1001), (2, 40, 3072)]


@pytest.mark.skipif(not extension_built(), reason="fastdiv._C is not built: no CPU kernels to compare with")
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_raw_ops_match_cpu_kernels(backend, dtype, shape):
    """Every op of the backend's namespace on CUDA tensors against torch.ops.fastdiv on CPU tensors:
    same shapes, dtypes, contiguous outputs, values to the accumulation dtype's rounding."""
    x = randn(*shape, seed=sum(shape)).to(dtype)
    x[0, 0, 0] = 0  # sign(0) = 0 in the l1 terms
    extras = _op_extras(x)
    want = _op_results(torch.ops.fastdiv, x, extras)
    got = _op_results(getattr(torch.ops, NAMESPACES[backend]), x.to(DEVICE),
                      {k: v.to(DEVICE) for k, v in extras.items()})
    for name, expected in want.items():
        actual = got[name]
        pairs = zip(actual, expected) if isinstance(expected, tuple) else [(actual, expected)]
        for k, (a, e) in enumerate(pairs):
            assert a.device.type == torch.device(DEVICE).type and a.is_contiguous(), f"{name}[{k}]"
            tol = OUT_TOL[dtype] if e.dtype == dtype else ACC_TOL[e.dtype]
            close(a, e, tol, f"{name}[{k}] {dtype_id(dtype)} {tuple(shape)}")


@pytest.mark.skipif(not extension_built(), reason="fastdiv._C is not built: no CPU kernels to compare with")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_raw_ops_strided_input_match_cpu_kernels(backend, dtype):
    """The ops read strided B and n dims and misaligned rows in place: the same values as the CPU ops."""
    base = randn(6, 2 * 10, 3073, seed=9).to(dtype)
    views = {"strided-B-n": lambda t: t[::2, ::2, :3072], "misaligned-rows": lambda t: t[:3, :10, 1:],
             "transposed": lambda t: t[:5, :6, :3072].transpose(0, 1)}
    for layout, view in views.items():
        x = view(base)
        assert not x.is_contiguous() and x.stride(2) == 1
        extras = _op_extras(x.contiguous())
        want = _op_results(torch.ops.fastdiv, x, extras)
        got = _op_results(getattr(torch.ops, NAMESPACES[backend]), view(base.to(DEVICE)),
                          {k: v.to(DEVICE) for k, v in extras.items()})
        for name, expected in want.items():
            pairs = zip(got[name], expected) if isinstance(expected, tuple) else [(got[name], expected)]
            for k, (a, e) in enumerate(pairs):
                tol = OUT_TOL[dtype] if e.dtype == dtype else ACC_TOL[e.dtype]
                close(a, e, tol, f"{layout} {name}[{k}]")


def test_every_op_has_a_cuda_kernel():
    if not cuda_built():
        pytest.skip(NO_CUDA_KERNELS)
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    missing = [name for name in SCHEMAS if not has_kernel(f"fastdiv::{name}", "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"


# =====================================================================================================
# 3. layouts: strided B and n, misaligned rows, sample_dim=0 (values; the no-copy check is in section 8)
# =====================================================================================================

_B, _N, _F1, _F2 = 3, 5, 4, 6
#: test_losses.py's layouts plus two that only matter on a GPU: rows that start off a 16-byte boundary
#: (vectorized loads) and an odd stride between the n rows
GPU_LAYOUTS = {
    **LAYOUTS,
    "misaligned-rows": ((_B, _N, _F1 * _F2 + 1), lambda t: t[..., 1:].unflatten(2, (_F1, _F2)), 1),
    "odd-n-stride-sample_dim0": ((_N, _B, _F1 * _F2 + 3), lambda t: t[..., :_F1 * _F2].unflatten(2, (_F1, _F2)), 0),
}
#: the layouts fastdiv promises to read in place (features already of unit stride); the other two of
#: test_losses.py ('permuted-features', 'strided-features') make the one documented copy
NO_COPY_LAYOUTS = [name for name in GPU_LAYOUTS if name not in ("permuted-features", "strided-features")]


def _layout(name: str):
    shape, make_view, sample_dim = GPU_LAYOUTS[name]
    base = randn(*shape, seed=21)
    view = make_view(base)
    assert view.shape == ((_N, _B, _F1, _F2) if sample_dim == 0 else (_B, _N, _F1, _F2)), name
    return base, make_view, sample_dim


@pytest.mark.parametrize("name", list(GPU_LAYOUTS))
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_layouts(backend, case, name):
    """Values and gradients (w.r.t. the base tensor of the view) equal the reference's on a contiguous
    [B, n, ...] copy (fp64), and the fp32 results equal the same backend's on that copy."""
    base, make_view, sample_dim = _layout(name)
    w = upstream_weights(_B)
    fused = lambda t: case(make_view(t), backend=backend, reduction="none", sample_dim=sample_dim)  # noqa: E731
    v, grad = value_and_grad(on_device(fused), base, w)
    v_ref, grad_ref = value_and_grad(
        lambda t: case(as_batch_first(make_view(t), sample_dim), backend="torch", reduction="none"), base, w)
    assert_close64(v, v_ref, "value")
    assert_close64(grad, grad_ref, "gradient", rtol=1e-8)
    b32 = base.float().to(DEVICE)
    v32 = fused(b32)
    v32_copy = case(as_batch_first(make_view(b32), sample_dim), backend=backend, reduction="none")
    close(v32, v32_copy, (1e-6, 1e-7), "fp32 value vs a contiguous copy")


@pytest.mark.parametrize("name", list(GPU_LAYOUTS))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_layouts_normalize_cosine_gram_stats(backend, name):
    base, make_view, sample_dim = _layout(name)
    view = make_view(base.to(DEVICE))
    contiguous = as_batch_first(make_view(base), sample_dim)
    u = fastdiv.normalize(view, backend=backend, sample_dim=sample_dim)
    assert u.shape == view.shape  # normalize returns the caller's layout
    assert_close64(as_batch_first(u, sample_dim).cpu(), reference.normalize(contiguous), "normalize")
    assert_close64(fastdiv.cosine_gram(view, backend=backend, sample_dim=sample_dim).cpu(),
                   reference.cosine_gram(contiguous), "cosine_gram")
    stats = fastdiv.concentration_stats(view, backend=backend, sample_dim=sample_dim)
    expected = reference.concentration_stats(contiguous)
    for field in STAT_FIELDS:
        assert_close64(getattr(stats, field).cpu(), getattr(expected, field), field)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_misaligned_rows_every_dtype(backend, case, dtype):
    """D = 3072 rows starting one element past an aligned address, with an odd row stride (3073), in
    every dtype: parity with the reference, and close to the same backend on an aligned copy."""
    x64 = randn(3, 10, 3073, seed=33)
    view = lambda t: t[..., 1:]  # noqa: E731
    w = upstream_weights(3)
    truth = value_and_grad(lambda t: case(view(t), backend="torch", reduction="none"), x64, w)
    xl = x64.to(dtype)
    got = value_and_grad(on_device(lambda t: case(view(t), backend=backend, reduction="none")), xl, w)
    if dtype == torch.float64:
        assert_close64(got[0], truth[0], "value")
        assert_close64(got[1], truth[1], "gradient", rtol=1e-8)
    else:
        ref = value_and_grad(lambda t: case(view(t), backend="torch", reduction="none"), xl, w)
        assert_parity(got[0], ref[0], truth[0], dtype, "value")
        assert_parity(got[1], ref[1], truth[1], dtype, "gradient")
    aligned = value_and_grad(on_device(lambda t: case(t, backend=backend, reduction="none")), view(xl).contiguous(), w)
    close(got[0], aligned[0], ACC_TOL[acc_of(dtype)], "value vs an aligned copy")


# =====================================================================================================
# 4. B = 0, degenerate rows, non-finite inputs
# =====================================================================================================


# the reference's u.var over an empty batch warns (harmless: the result is empty)
@pytest.mark.filterwarnings("ignore:var\\(\\):UserWarning")
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_empty_batch(backend, case, reduction):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.zeros(0, 4, 3, 5, dtype=dtype, device=DEVICE, requires_grad=True)
        out = case(x, backend=backend, reduction=reduction)
        assert out.dtype == acc_of(dtype) and out.device == x.device
        if reduction == "none":
            assert out.shape == (0,)
        else:
            assert out.shape == () and out.item() == 0.0
        out.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("sample_dim", [1, 0])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_empty_batch_normalize_cosine_gram_stats(backend, sample_dim):
    assert_empty_batch_ops(backend, sample_dim, DEVICE)


# fp16 cannot hold eps = 1e-12 nor the ~1/eps derivative of a row below the norm floor: as in
# test_losses.py, those kinds have their own fp16 test below
DEGENERATE_CASES = [pytest.param(kind, dtype, id=f"{kind}-{dtype_id(dtype)}") for kind in DEGENERATE
                    for dtype in ALL_DTYPES if not (dtype == torch.float16 and kind in FP16_BELOW_FLOOR)]


@pytest.mark.parametrize("kind,dtype", DEGENERATE_CASES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_degenerate_rows_finite(backend, kind, dtype):
    """Zero, duplicate, aligned, anti-aligned and tiny rows: finite losses, gradients and statistics."""
    assert_degenerate_finite(degenerate(kind, dtype).to(DEVICE), backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_zero_rows_fp16_finite(backend):
    bad = []
    for case in LOSS_CASES:
        for kind in ("zero-row", "all-zero"):
            leaf = degenerate(kind, torch.float16).to(DEVICE).requires_grad_()
            out = case(leaf, backend=backend, reduction="none")
            if not torch.isfinite(out).all():
                bad.append(f"{case.id}/{kind} forward")
            out.sum().backward()
            if not torch.isfinite(leaf.grad).all():
                bad.append(f"{case.id}/{kind} gradient")
    assert not bad, f"backend={backend!r}: NaN/Inf on fp16 inputs with zero rows: {bad}"


@pytest.mark.parametrize("kind", DEGENERATE)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_degenerate_rows_match_reference(backend, case, kind):
    """fp64: the reference's values and gradients on degenerate rows (as test_losses.py does for 'cpu')."""
    x = degenerate(kind, torch.float64)
    w = upstream_weights(2)
    got = value_and_grad(on_device(loss_fn(case, backend)), x, w)
    ref = value_and_grad(loss_fn(case, "torch"), x, w)
    assert_close64(got[0], ref[0], "value", rtol=1e-8)
    if case.id == "max" and max_subgradient_ambiguous(x, kind):
        return
    assert_close64(got[1], ref[1], "gradient", rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("value", list(NONFINITE))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_nonfinite_input_as_on_cpu(backend, dtype, value):
    """A NaN or Inf entry makes that input's results NaN, never raises, and leaves the other inputs'
    values and gradients alone, with the CPU kernels' values."""
    x = randn(3, 4, 5, seed=71).to(dtype)
    x[1, 2, 3] = NONFINITE[value]
    xd = x.to(DEVICE)
    clean = torch.tensor([True, False, True])
    for case in LOSS_CASES:
        leaf = xd.clone().requires_grad_()
        out = case(leaf, backend=backend, reduction="none")
        assert torch.isnan(out).tolist() == [False, True, False], f"{case.id}: {out}"
        close(out, case(x, backend=CPU_BACKEND, reduction="none"), ACC_TOL[acc_of(dtype)], f"{case.id} vs CPU")
        out.sum().backward()  # no crash
        cpu_leaf = x.clone().requires_grad_()
        case(cpu_leaf, backend=CPU_BACKEND, reduction="none").sum().backward()
        close(leaf.grad.cpu()[clean], cpu_leaf.grad[clean], OUT_TOL[dtype], f"{case.id} gradient of the clean inputs")
        for reduction in ("mean", "sum"):
            assert torch.isnan(case(xd, backend=backend, reduction=reduction)), case.id
    for q in (1.0, 2.0, math.inf):
        stats = fastdiv.concentration_stats(xd, q=q, backend=backend)
        for field in STAT_FIELDS:
            assert torch.isnan(getattr(stats, field)).tolist() == [False, True, False], f"{field} (q={q})"
    u = fastdiv.normalize(xd, backend=backend).cpu()
    assert torch.isnan(u.flatten(2)).any(-1).tolist() == [[False] * 4, [False, False, True, False], [False] * 4]
    c = fastdiv.cosine_gram(xd, backend=backend).cpu()
    assert torch.isnan(c.flatten(1)).any(-1).tolist() == [False, True, False]
    assert torch.isfinite(c[clean]).all()


# =====================================================================================================
# 5. determinism: same input, same bits
# =====================================================================================================

DETERMINISM_SHAPES = {"B128-n10-D3072": (128, 10, 3072), "B128-n40-D3072": (128, 40, 3072),
                      "B2-n10-D200000": (2, 10, 200_000)}


@pytest.mark.parametrize("shape", list(DETERMINISM_SHAPES))
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic(backend, case, shape):
    for dtype in (torch.float32, torch.bfloat16):
        x = gpu_randn(*DETERMINISM_SHAPES[shape], seed=3, dtype=dtype)
        w = torch.rand(x.shape[0], device=DEVICE) + 0.5

        def run():
            leaf = x.clone().requires_grad_()
            out = case(leaf, backend=backend, reduction="none")
            (grad,) = torch.autograd.grad(out, leaf, w)
            return out, grad

        (v1, g1), (v2, g2) = run(), run()
        assert torch.equal(v1, v2), f"{dtype_id(dtype)}: two runs gave different values"
        assert torch.equal(g1, g2), f"{dtype_id(dtype)}: two runs gave different gradients"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic_normalize_cosine_gram_stats(backend):
    for shape in DETERMINISM_SHAPES.values():
        x = gpu_randn(*shape, seed=4)
        for fn in (fastdiv.normalize, fastdiv.cosine_gram):
            assert torch.equal(fn(x, backend=backend), fn(x, backend=backend)), fn.__name__
        for q in (1.0, math.inf):
            a = fastdiv.concentration_stats(x, q=q, backend=backend)
            b = fastdiv.concentration_stats(x, q=q, backend=backend)
            assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in STAT_FIELDS), f"stats q={q}"


# =====================================================================================================
# 6. float64 gradcheck, opcheck, torch.compile
# =====================================================================================================


@pytest.mark.parametrize("layout", list(GRADCHECK_LAYOUTS))
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gradcheck(backend, case, layout):
    shape, kw = GRADCHECK_LAYOUTS[layout]
    x = randn(*shape, seed=11).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: case(t, backend=backend, **kw), (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case_id,kw", GRADCHECK_PARAMS, ids=[f"{c}-{kw}" for c, kw in GRADCHECK_PARAMS])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gradcheck_hyperparameters(backend, case_id, kw):
    x = randn(2, 4, 5, seed=12).to(DEVICE).requires_grad_()
    case = LOSS_BY_ID[case_id]
    assert torch.autograd.gradcheck(lambda t: case(t, backend=backend, reduction="none", **kw), (x,), atol=1e-7,
                                    rtol=1e-5)


@pytest.mark.parametrize("sample_dim", [1, 0])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gradcheck_normalize_cosine_gram(backend, sample_dim):
    x = randn(3, 2, 2, 3, seed=14).to(DEVICE).requires_grad_()
    for fn in (fastdiv.normalize, fastdiv.cosine_gram):
        assert torch.autograd.gradcheck(lambda t: fn(t, backend=backend, sample_dim=sample_dim), (x,), atol=1e-7,
                                        rtol=1e-5), fn.__name__


def _opcheck_calls(ops, op: str, dtype: torch.dtype) -> list[tuple[tuple, tuple | None]]:
    """(args, test_utils) of the opcheck calls of ``op`` of the namespace ``ops`` on GPU tensors
    (test_utils None: opcheck's default, every check)."""
    acc = acc_of(dtype)

    def t(*shape, seed, dt=dtype, grad=False):
        return randn(*shape, seed=seed).to(dt).to(DEVICE).requires_grad_(grad)

    if op == "gram_loss":
        return [((t(3, 4, 5, seed=9, grad=True), head, EPS, JITTER, p, rho_max), None)
                for head in HEADS for p, rho_max in ((0.0, RHO_MAX), (2.5, 0.9))]
    if op == "gram":
        return [((t(3, 4, 5, seed=9, grad=True), with_l1), None) for with_l1 in (True, False)]
    if op == "gram_pullback":
        x, a = t(3, 4, 5, seed=9), t(3, 4, 4, seed=10, dt=acc)
        beta, scale = t(3, 4, seed=11, dt=acc), t(3, seed=12, dt=acc)
        return [((x, a, beta), None), ((x, a, None), None), ((x, a, beta, scale), None),
                ((x, a, None, scale[:1].expand(3)), None)]
    if op == "concentration_stats":
        return [((t(3, 4, 5, seed=9), q, EPS, JITTER, RHO_MAX), None) for q in (1.0, 2.0, math.inf)]
    if op == "normalize":
        return [((t(3, 4, 5, seed=9, grad=True), EPS), None)]
    if op == "normalize_pullback":
        return [((t(3, 4, 5, seed=9), t(3, 4, 5, seed=13), EPS), None)]
    if op == "column_stats":
        return [((t(3, 4, 5, seed=9, grad=True), EPS), None)]
    if op == "column_stats_pullback":
        x = t(3, 4, 5, seed=9)
        r, mean, _ = ops.column_stats(x, EPS)
        g_r, g_m, g_v = t(3, 4, seed=13, dt=acc), t(3, 5, seed=14, dt=acc), t(3, 5, seed=15, dt=acc)
        return [((x, r, mean, g_r, g_m, g_v, EPS), None), ((x, r, mean, None, None, g_v, EPS), None)]
    if op == "eot_step":
        # not differentiable (its autograd raises): schema and fake-tensor checks, as test_eot.py
        x, x0, g = (v.to(dtype).to(DEVICE) for v in make_eot(batch=3, n=2, features=(5, 7), seed=14))
        xv, x0v, rows = x.flatten(1), x0.flatten(1), g.transpose(0, 1).flatten(2)
        alpha = torch.full((3,), 0.01, dtype=acc, device=DEVICE)
        eps = torch.tensor([0.0, 0.03, 1.0], dtype=acc, device=DEVICE)
        m = momentum_like(xv).to(acc).to(DEVICE)
        return [((xv, x0v, rows, alpha, eps, norm, 0.0, 1.0, clip, momentum, 0.9), ("test_schema", "test_faketensor"))
                for norm in ("linf", "l2") for momentum in (None, m) for clip in (True, False)]
    raise AssertionError(f"no opcheck calls for {op}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("op", list(SCHEMAS))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck(backend, op, dtype):
    ops = getattr(torch.ops, NAMESPACES[backend])
    for args, test_utils in _opcheck_calls(ops, op, dtype):
        kw = {} if test_utils is None else {"test_utils": test_utils}
        opcheck(getattr(ops, op).default, args, **kw)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck_half_and_strided_inputs(backend):
    ops = getattr(torch.ops, NAMESPACES[backend])
    base = randn(4, 8, 6, seed=16).to(DEVICE)
    for x in (base.half(), base.bfloat16(), base[::2, ::2].float(), base.transpose(0, 1).float()):
        opcheck(ops.gram_loss.default, (x.detach().requires_grad_(), "dpp", EPS, JITTER, 0.0, RHO_MAX))
        opcheck(ops.concentration_stats.default, (x, 1.0, EPS, JITTER, RHO_MAX))
        opcheck(ops.column_stats.default, (x.detach().requires_grad_(), EPS))


def _compiled_losses(backend: str):
    def fn(g):
        kw = dict(backend=backend)
        stats = fastdiv.concentration_stats(g, q=math.inf, **kw)
        total = (fastdiv.dpp_loss(g, **kw) + fastdiv.mean_cosine_loss(g, reduction="sum", **kw)
                 + fastdiv.kappa_loss(g, p=3.0, **kw) + fastdiv.max_cosine_loss(g, **kw)
                 + fastdiv.smoothmax_cosine_loss(g, **kw) + fastdiv.gal_loss(g, **kw) + fastdiv.mean_penalty(g, **kw)
                 + fastdiv.sparsity_penalty(g, **kw) + fastdiv.variance_penalty(g, **kw)
                 + fastdiv.variance_penalty(g, kind="min", **kw)
                 + fastdiv.variance_penalty(g, kind="softmin", temperature=0.5, **kw)
                 + (fastdiv.dpp_loss(g.transpose(0, 1), sample_dim=0, reduction="none", **kw) * 2).sum())
        return (total + fastdiv.normalize(g, **kw).square().mean() + fastdiv.cosine_gram(g, **kw).mean()
                + stats.rho.sum())
    return fn


def _eager_and_compiled(fn, compiled, x):
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ea, ca = fn(a), compiled(b)
    ea.backward()
    ca.backward()
    return (ea, a.grad), (ca, b.grad)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph(backend):
    """Every public op under torch.compile(fullgraph=True) (aot_eager: the fake kernels and autograd
    registrations), two batch sizes (a recompile), against eager on the GPU."""
    torch._dynamo.reset()
    fn = _compiled_losses(backend)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for shape in [(3, 5, 2, 7), (4, 5, 2, 7)]:
        x = randn(*shape, seed=21).float().to(DEVICE)
        (e, ge), (c, gc) = _eager_and_compiled(fn, compiled, x)
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_inductor(backend):
    """The default compiler (Inductor, which generates Triton code around the fastdiv ops) on CUDA."""
    torch._dynamo.reset()
    fn = lambda g: (fastdiv.dpp_loss(g, backend=backend) + fastdiv.variance_penalty(g, backend=backend)  # noqa: E731
                    + fastdiv.sparsity_penalty(g, reduction="sum", backend=backend))
    compiled = torch.compile(fn, fullgraph=True)
    x = gpu_randn(16, 10, 3072, seed=22)
    (e, ge), (c, gc) = _eager_and_compiled(fn, compiled, x)
    torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


# =====================================================================================================
# 7. eot_step on the GPU against the reference and the CPU kernels
# =====================================================================================================


def _eot_kwargs(norm: str) -> dict:
    return dict(alpha=1.5 / 255 if norm == "linf" else 0.3, eps=EPS8 if norm == "linf" else 0.5, norm=norm)


@pytest.mark.parametrize("with_momentum", [False, True], ids=["plain", "momentum"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_eot_step_matches_reference_and_cpu(backend, dtype, norm, with_momentum):
    x, x0, g = make_eot(dtype=dtype, seed=3)
    kw = _eot_kwargs(norm)
    if with_momentum:
        kw.update(momentum=momentum_like(x), decay=0.9)
    got = eot_step(x.to(DEVICE), x0.to(DEVICE), g.to(DEVICE), backend=backend,
                   **{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    want = reference.eot_step(x, x0, g, **kw)
    cpu = eot_step(x, x0, g, backend=CPU_BACKEND, **kw)
    got, want, cpu = ((r,) if not with_momentum else r for r in (got, want, cpu))
    assert got[0].device.type == torch.device(DEVICE).type and got[0].dtype == dtype and got[0].shape == x.shape
    assert torch.isfinite(got[0]).all()
    assert_out_close(got[0].cpu(), want[0], dtype, f"{backend} {norm} {dtype_id(dtype)} vs reference")
    assert_out_close(got[0].cpu(), cpu[0], dtype, f"{backend} {norm} {dtype_id(dtype)} vs {CPU_BACKEND}")
    if with_momentum:
        m_got, m_want = got[1].cpu(), want[1]
        assert m_got.dtype == dtype and m_got.shape == x.shape
        tol = 1e-12 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(m_got.double(), m_want.double(), rtol=tol, atol=tol * m_want.abs().max().item())


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_eot_step_per_example_alpha_eps(backend, norm):
    x, x0, g = make_eot(batch=4, seed=4)
    alpha = torch.tensor([0.0, 0.01, 0.5, 2.0], dtype=torch.float64)
    eps = torch.tensor([0.05, 0.0, 0.2, 1.0], dtype=torch.float64)
    xd, x0d, gd = x.to(DEVICE), x0.to(DEVICE), g.to(DEVICE)
    got = eot_step(xd, x0d, gd, alpha=alpha.to(DEVICE), eps=eps.to(DEVICE), norm=norm, backend=backend).cpu()
    assert_out_close(got, reference.eot_step(x, x0, g, alpha=alpha, eps=eps, norm=norm), torch.float64)
    assert_out_close(got, eot_step(x, x0, g, alpha=alpha, eps=eps, norm=norm, backend=CPU_BACKEND), torch.float64)
    # example 1: eps = 0 returns x0 exactly
    torch.testing.assert_close(got[1], x0[1], rtol=0, atol=0)
    for i in range(4):  # the per-example step is the scalar step of each example alone
        alone = eot_step(xd[i:i + 1], x0d[i:i + 1], gd[:, i:i + 1], alpha=alpha[i].item(), eps=eps[i].item(), norm=norm,
                         backend=backend)
        assert_out_close(got[i:i + 1], alone.cpu(), torch.float64, f"example {i}")


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_eot_step_sample_dim_and_strides(backend, norm):
    x, x0, g = make_eot(batch=3, n=5, features=(2, 7, 9), seed=6)
    x, x0, g = x.to(DEVICE), x0.to(DEVICE), g.to(DEVICE)
    kw = dict(alpha=0.05, eps=0.1, norm=norm, backend=backend)
    base = eot_step(x, x0, g, **kw)
    want = reference.eot_step(x.cpu(), x0.cpu(), g.cpu(), alpha=0.05, eps=0.1, norm=norm)
    assert_out_close(base.cpu(), want, torch.float64)
    big = torch.zeros(10, 6, 2, 7, 9, dtype=torch.float64, device=DEVICE)
    big[::2, ::2] = g
    m = momentum_like(x.cpu()).to(DEVICE)
    for what, got in [
        ("sample_dim=1 contiguous", eot_step(x, x0, g.transpose(0, 1).contiguous(), sample_dim=1, **kw)),
        ("sample_dim=1 view", eot_step(x, x0, g.transpose(0, 1), sample_dim=1, **kw)),
        ("strided n and B", eot_step(x, x0, big[::2, ::2], **kw)),
        ("misaligned x and x0", eot_step(torch.cat([x.flatten(1)[:, :1], x.flatten(1)], 1)[:, 1:].view_as(x),
                                         torch.cat([x0.flatten(1)[:, :1], x0.flatten(1)], 1)[:, 1:].view_as(x0),
                                         g, **kw)),
    ]:
        assert_out_close(got.cpu(), base.cpu(), torch.float64, what)
    got, m_new = eot_step(x, x0, big[::2, ::2], momentum=m, **kw)
    want, m_want = eot_step(x, x0, g, momentum=m, **kw)
    assert_out_close(got.cpu(), want.cpu(), torch.float64, "momentum, strided grads")
    assert_out_close(m_new.cpu(), m_want.cpu(), torch.float64, "momentum buffer, strided grads")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_eot_step_empty_nan_and_determinism(backend):
    for norm in ("linf", "l2"):
        x, x0, g = (t.to(DEVICE) for t in make_eot(batch=0, features=(3, 4)))
        out = eot_step(x, x0, g, alpha=0.1, eps=0.1, norm=norm, backend=backend)
        assert out.shape == (0, 3, 4) and out.dtype == x.dtype
        out, m = eot_step(x, x0, g, alpha=0.1, eps=0.1, norm=norm, momentum=torch.zeros_like(x), backend=backend)
        assert out.shape == (0, 3, 4) and m.shape == (0, 3, 4)
        for with_momentum in (False, True):  # NaN in one example's gradient stays in that example
            x, x0, g = make_eot(seed=12)
            g[2, 1, 0, 3, 4] = math.nan
            m = momentum_like(x) if with_momentum else None
            res = eot_step(x.to(DEVICE), x0.to(DEVICE), g.to(DEVICE), alpha=0.02, eps=EPS8, norm=norm,
                           momentum=None if m is None else m.to(DEVICE), backend=backend)
            got = (res[0] if with_momentum else res).cpu()
            assert torch.isnan(got[1]).any() and torch.isfinite(got[[0, 2]]).all()
            want = reference.eot_step(x, x0, g, alpha=0.02, eps=EPS8, norm=norm, momentum=m)
            torch.testing.assert_close(got, want[0] if with_momentum else want, rtol=1e-12, atol=1e-12, equal_nan=True)
        # the attack size: B = 128, n = 10 gradients of 3 x 32 x 32, fp32, twice
        x0 = torch.rand(128, 3, 32, 32, generator=torch.Generator(device=DEVICE).manual_seed(0), device=DEVICE)
        x = (x0 + 0.01 * gpu_randn(128, 3, 32, 32, seed=1)).clamp(0, 1)
        g = gpu_randn(10, 128, 3, 32, 32, seed=2)
        m = gpu_randn(128, 3, 32, 32, seed=3)
        runs = [eot_step(x, x0, g, alpha=2 / 255, eps=EPS8, norm=norm, momentum=m, backend=backend) for _ in range(2)]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), norm


def test_eot_step_mixed_devices_error():
    x, x0, g = make_eot(seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="x0"):
        eot_step(x.to(DEVICE), x0, g.to(DEVICE), alpha=0.01, eps=0.03)
    with pytest.raises(ValueError, match="alpha"):
        eot_step(x.to(DEVICE), x0.to(DEVICE), g.to(DEVICE), alpha=torch.full((3,), 0.01), eps=0.03)


# =====================================================================================================
# 8. launch counts (torch.profiler), and no copies for strided inputs and sample_dim=0
# =====================================================================================================


def forward_backward_work(fn, x: torch.Tensor, grad: torch.Tensor):
    """GPU work of one forward ``fn(x)`` and of its backward with the upstream gradient ``grad``, made
    beforehand: torch.autograd.grad, so neither a ones-seed for the output nor an accumulation into
    x.grad is counted. One unprofiled warm-up call first (module loading, allocator)."""
    torch.autograd.grad(fn(x), x, grad)
    outputs = []
    fwd = gpu_work(lambda: outputs.append(fn(x)))
    bwd = gpu_work(lambda: torch.autograd.grad(outputs[0], x, grad))
    return fwd, bwd


def test_profiler_counts_kernels_only():
    """The counting itself: two elementwise kernels count 2; a device-to-device copy_ of a contiguous
    tensor (a cudaMemcpyAsync, not a kernel) counts as a copy."""
    x = torch.ones(1 << 20, device=DEVICE)
    y = torch.empty_like(x)
    kernels, copies = gpu_work(lambda: x.add(1).mul_(2))
    assert len(kernels) == 2 and not copies, (kernels, copies)
    kernels, copies = gpu_work(lambda: y.copy_(x))
    assert not kernels and len(copies) == 1, (kernels, copies)


def _one_and_one(fwd, bwd, what: str) -> None:
    (fk, fc), (bk, bc) = fwd, bwd
    assert len(fk) == 1 and not fc, f"{what}: forward launched {len(fk)} kernels {fk} and copies {fc}, not one kernel"
    assert len(bk) == 1 and not bc, f"{what}: backward launched {len(bk)} kernels {bk} and copies {bc}, not one kernel"


LAUNCH_CASES = [(2, torch.float32), (10, torch.float32), (10, torch.bfloat16), (10, torch.float16),
                (10, torch.float64), (32, torch.float32), (32, torch.bfloat16)]


@needs_cuda_kernels
@pytest.mark.parametrize("n,dtype", LAUNCH_CASES, ids=[f"n{n}-{dtype_id(t)}" for n, t in LAUNCH_CASES])
def test_launches_dpp_loss(n, dtype):
    """The issue's target: for n <= 32, forward of dpp_loss on the CUDA kernels is one launch and its
    backward one launch. Measured on the fused op itself (reduction='none' with a given [B] upstream
    gradient): 'mean' and 'sum' add PyTorch's own reduction kernels around it."""
    x = gpu_randn(128, n, 3072, seed=n, dtype=dtype).requires_grad_()
    grad = torch.rand(128, device=DEVICE, dtype=acc_of(dtype)) + 0.5
    fwd, bwd = forward_backward_work(lambda t: fastdiv.dpp_loss(t, backend="cuda", reduction="none"), x, grad)
    _one_and_one(fwd, bwd, f"dpp_loss n={n} {dtype_id(dtype)}")


@needs_cuda_kernels
@pytest.mark.parametrize("case", [c for c in LOSS_CASES if not c.id.startswith("var-")],
                         ids=[c.id for c in LOSS_CASES if not c.id.startswith("var-")])
def test_launches_gram_heads(case):
    """Every Gram-family head shares the fused gram_loss op: one launch forward, one backward (n = 10)."""
    x = gpu_randn(128, 10, 3072, seed=1).requires_grad_()
    grad = torch.rand(128, device=DEVICE) + 0.5
    fwd, bwd = forward_backward_work(lambda t: case(t, backend="cuda", reduction="none"), x, grad)
    _one_and_one(fwd, bwd, case.id)


@needs_cuda_kernels
def test_launches_sum_reduction_backward():
    """reduction='sum' hands the op's backward a stride-0 expansion of the scalar upstream gradient; the
    pullback reads it in place: still one kernel, no copy of the gradient."""
    x = gpu_randn(128, 10, 3072, seed=2).requires_grad_()
    seed = torch.ones((), device=DEVICE)
    _, bwd = forward_backward_work(lambda t: fastdiv.dpp_loss(t, backend="cuda", reduction="sum"), x, seed)
    kernels, copies = bwd
    assert len(kernels) == 1 and not copies, f"backward of reduction='sum': kernels {kernels}, copies {copies}"


@pytest.mark.parametrize("name", NO_COPY_LAYOUTS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_copy_for_strided_and_sample_dim0(backend, name):
    """Strided B and n dims, misaligned rows and sample_dim=0 are read in place: the forward of dpp_loss
    and of concentration_stats does the same GPU work as on a contiguous [B, n, D] tensor, and no
    copy (for the CUDA kernels: exactly one kernel, no memcpy)."""
    shape, make_view, sample_dim = GPU_LAYOUTS[name]
    base = gpu_randn(*shape, seed=5)
    view = make_view(base)
    contiguous = as_batch_first(view, sample_dim)
    calls = {
        "dpp_loss": lambda t, sd: fastdiv.dpp_loss(t, backend=backend, reduction="none", sample_dim=sd),
        "concentration_stats": lambda t, sd: fastdiv.concentration_stats(t, backend=backend, sample_dim=sd),
    }
    for what, call in calls.items():
        call(view, sample_dim), call(contiguous, 1)  # warm-up (Triton compiles each stride specialization)
        k_view, c_view = gpu_work(lambda: call(view, sample_dim))
        k_cont, c_cont = gpu_work(lambda: call(contiguous, 1))
        assert len(k_view) == len(k_cont) and len(c_view) == len(c_cont), (
            f"{what} on the {name} view: kernels {k_view}, copies {c_view}; on a contiguous copy: kernels "
            f"{k_cont}, copies {c_cont}")
        if backend == "cuda" and what == "dpp_loss":
            assert len(k_view) == 1 and not c_view, f"{what} on the {name} view: kernels {k_view}, copies {c_view}"


# =====================================================================================================
# 9. what the installation reports
# =====================================================================================================


@needs_cuda_kernels
def test_info_reports_the_cuda_backend(capsys):
    """``python -m fastdiv info`` (fastdiv.cli.main) and fastdiv.info(): CUDA built, 'auto' picks it for
    CUDA tensors, and 'auto' then runs the same kernels as backend='cuda'."""
    from fastdiv.cli import main

    data = fastdiv.info()
    assert data["backends"]["cuda"] is True
    assert data["auto"]["cuda"] == "cuda"
    assert data["cuda_device"] == torch.cuda.get_device_name(0)
    assert main(["info", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["backends"]["cuda"] is True and printed["auto"]["cuda"] == "cuda"
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^\s*cuda\s+yes$", text, re.MULTILINE), text
    assert "cuda tensors -> cuda" in text, text
    x = gpu_randn(4, 10, 3072, seed=6)
    assert torch.equal(fastdiv.dpp_loss(x, reduction="none"), fastdiv.dpp_loss(x, backend="cuda", reduction="none"))
