"""Triton kernels (fastdiv/triton) against the C++ CPU ops, under the Triton interpreter on CPU tensors.

Every launcher of fastdiv.triton must reproduce torch.ops.fastdiv.<name>: same shapes, dtypes,
contiguous outputs, and values to fp64 rounding for fp64 inputs and to fp32 rounding otherwise.
Half-precision outputs may differ by one unit in the last place: the interpreter rounds fp32 -> bf16
toward zero (GPUs round to nearest even), and fp32 results of a different summation order can land on
the other side of a half-precision rounding boundary.
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

import fastdiv

if not fastdiv.extension_built():
    pytest.skip("fastdiv._C is not built: no CPU oracle", allow_module_level=True)

import fastdiv.triton as ft

pytestmark = pytest.mark.triton

ops = torch.ops.fastdiv
HEADS = ["dpp", "mean", "kappa", "max", "smoothmax", "gal", "mean_penalty", "sparsity"]
EPS, JITTER, RHO_MAX = 1e-12, 1e-4, 1.0 - 1e-6
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DT = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (rtol, atol relative to the largest |expected|) for acc-dtype outputs and for outputs in x's dtype
ACC_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 2e-6)}
OUT_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 2e-6), torch.float16: (2e-3, 1e-3),
           torch.bfloat16: (1.6e-2, 8e-3)}
SHAPES = [(2, 1), (3, 7), (5, 100), (17, 1001)]


def make_x(b, n, d, dtype, seed=0, layout="contiguous"):
    """[b, n, d] input; 'transposed' is the [n, b, d] -> [b, n, d] view of a sample-major buffer,
    'sliced' has a row stride of 2 d (every other row of a bigger buffer)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        return torch.randn(n, b, d, generator=gen, dtype=torch.float64).to(dtype).transpose(0, 1)
    if layout == "sliced":
        return torch.randn(b, 2 * n, d, generator=gen, dtype=torch.float64).to(dtype)[:, ::2]
    return torch.randn(b, n, d, generator=gen, dtype=torch.float64).to(dtype)


def check(actual, expected, tol, what=""):
    """Same structure, shape, dtype; contiguous; values within (rtol, atol * scale); NaN where NaN."""
    if isinstance(expected, torch.Tensor):
        actual, expected = (actual,), (expected,)
    assert len(actual) == len(expected)
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}[{k}]: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert a.dtype == e.dtype, f"{what}[{k}]: dtype {a.dtype} != {e.dtype}"
        assert a.is_contiguous(), f"{what}[{k}]: not contiguous"
        if e.numel() == 0:
            continue
        finite = torch.isfinite(e)
        scale = max(1.0, e.double()[finite].abs().max().item()) if finite.any() else 1.0
        rtol, atol = tol
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol * scale, equal_nan=True,
                                   msg=lambda m, k=k: f"{what}[{k}]: {m}")


def acc_tol(dtype):
    return ACC_TOL[torch.float64 if dtype == torch.float64 else torch.float32]


# ------------------------------------------------------------------------------------------------
# Gram and pullback
# ------------------------------------------------------------------------------------------------


GRAM_CASES = [(dt, n, d) for dt in ALL_DTYPES for n, d in SHAPES] + [
    (dt, 33, 1003) for dt in (torch.float64, torch.float32)]  # n > 32, the large-n case, per acc dtype


@pytest.mark.parametrize("dtype,n,d", GRAM_CASES, ids=lambda v: DT.get(v, str(v)))
def test_gram(dtype, n, d):
    x = make_x(2, n, d, dtype, seed=n + d)
    for with_l1 in (False, True):
        check(ft.gram(x, with_l1), ops.gram(x, with_l1), acc_tol(dtype), f"gram l1={with_l1}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DT.get)
@pytest.mark.parametrize("n,d", SHAPES + [(33, 100)], ids=str)
def test_gram_pullback(dtype, n, d):
    x = make_x(2, n, d, dtype, seed=n)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, n, n, generator=gen, dtype=torch.float64).to(acc)
    beta = torch.randn(2, n, generator=gen, dtype=torch.float64).to(acc)
    x[0, 0, 0] = 0  # sign(0) = 0
    check(ft.gram_pullback(x, a, None), ops.gram_pullback(x, a, None), OUT_TOL[dtype], "pullback")
    check(ft.gram_pullback(x, a, beta), ops.gram_pullback(x, a, beta), OUT_TOL[dtype], "pullback+beta")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DT.get)
def test_gram_pullback_scale(dtype):
    """The per-input scale (the fused losses' upstream gradient) of any stride, NaN / Inf / 0 included,
    as the C++ op applies it; the fastdiv_triton op takes it, or not (scale=None default)."""
    x = make_x(4, 5, 37, dtype, seed=20)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4, 5, 5, generator=gen, dtype=torch.float64).to(acc)
    beta = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(acc)
    diag = torch.diag_embed(torch.diagonal(a, dim1=1, dim2=2))
    for what, scale in [("contiguous", torch.randn(4, generator=gen, dtype=torch.float64).to(acc)),
                        ("stride 0", torch.tensor(-1.5, dtype=acc).expand(4)),
                        ("stride 2 special", torch.tensor([math.nan, 7, math.inf, 7, 0, 7, 3, 7], dtype=acc)[::2])]:
        for coef, b in ((a, beta), (a, None), (diag, beta)):
            check(ft.gram_pullback(x, coef, b, scale), ops.gram_pullback(x, coef, b, scale), OUT_TOL[dtype],
                  f"pullback scale {what} beta={b is not None}")
    t = torch.ops.fastdiv_triton
    check(t.gram_pullback(x, a, beta), ops.gram_pullback(x, a, beta), OUT_TOL[dtype], "op, scale defaulted")
    check(t.gram_pullback(x, a, beta, scale), ops.gram_pullback(x, a, beta, scale), OUT_TOL[dtype], "op, scale")


# ------------------------------------------------------------------------------------------------
# Heads and statistics
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DT.get)
@pytest.mark.parametrize("n,d", [(2, 1), (3, 7), (5, 100), (17, 33), (33, 60)], ids=str)
def test_gram_loss(head, dtype, n, d):
    x = make_x(3, n, d, dtype, seed=7 * n + d)
    args = (head, EPS, JITTER, 0.0, RHO_MAX)
    check(ft.gram_loss(x, *args), ops.gram_loss(x, *args), acc_tol(dtype), head)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT.get)
def test_gram_loss_half(head, dtype):
    x = make_x(2, 5, 70, dtype, seed=3)
    args = (head, EPS, JITTER, 0.0, RHO_MAX)
    check(ft.gram_loss(x, *args), ops.gram_loss(x, *args), acc_tol(dtype), head)


@pytest.mark.parametrize("head", ["kappa", "dpp"])
def test_gram_loss_params(head):
    """Non-default p, jitter and a rho_max below the sample's rho (the clamped, zero-gradient branch)."""
    x = make_x(2, 4, 9, torch.float64, seed=5) + 1.0  # rho well above 0
    for p, jitter, rho_max in ((5.0, 1e-2, RHO_MAX), (0.0, 1e-4, 0.3)):
        args = (head, EPS, jitter, p, rho_max)
        check(ft.gram_loss(x, *args), ops.gram_loss(x, *args), ACC_TOL[torch.float64], f"{head} {p} {rho_max}")


@pytest.mark.parametrize("q", [1.0, 2.0, 3.5, math.inf], ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DT.get)
@pytest.mark.parametrize("n,d", [(2, 1), (5, 100), (17, 1001)], ids=str)
def test_concentration_stats(q, dtype, n, d):
    x = make_x(2, n, d, dtype, seed=n * d)
    check(ft.concentration_stats(x, q, EPS, JITTER, RHO_MAX), ops.concentration_stats(x, q, EPS, JITTER, RHO_MAX),
          acc_tol(dtype), "stats")


# ------------------------------------------------------------------------------------------------
# Row kernels
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DT.get)
@pytest.mark.parametrize("n,d", SHAPES + [(33, 100)], ids=str)
def test_normalize(dtype, n, d):
    x = make_x(2, n, d, dtype, seed=d)
    g = make_x(2, n, d, dtype, seed=d + 1)
    check(ft.normalize(x, EPS), ops.normalize(x, EPS), OUT_TOL[dtype], "normalize")
    check(ft.normalize_pullback(x, g, EPS), ops.normalize_pullback(x, g, EPS), OUT_TOL[dtype], "normalize_pullback")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DT.get)
@pytest.mark.parametrize("n,d", SHAPES + [(33, 100)], ids=str)
def test_column_stats(dtype, n, d):
    x = make_x(2, n, d, dtype, seed=n * 3 + d)
    expected = ops.column_stats(x, EPS)
    check(ft.column_stats(x, EPS), expected, acc_tol(dtype), "column_stats")
    r, mean, _ = expected
    gen = torch.Generator().manual_seed(2)
    gr, gm, gv = (torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in expected)
    for grads in ((gr, gm, gv), (None, gm, None), (gr, None, None), (None, None, gv), (None, None, None)):
        check(ft.column_stats_pullback(x, r, mean, *grads, EPS), ops.column_stats_pullback(x, r, mean, *grads, EPS),
              OUT_TOL[dtype], f"column_stats_pullback {[g is not None for g in grads]}")


# ------------------------------------------------------------------------------------------------
# Layouts, empty batches, degenerate rows, NaN
# ------------------------------------------------------------------------------------------------


def _all_ops(x):
    """(name, triton result, CPU result) for every op on x (fp64 or fp32)."""
    gen = torch.Generator().manual_seed(4)
    B, n, d = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    a = torch.randn(B, n, n, generator=gen, dtype=torch.float64).to(acc)
    beta = torch.randn(B, n, generator=gen, dtype=torch.float64).to(acc)
    g = torch.randn(B, n, d, generator=gen, dtype=torch.float64).to(x.dtype)
    r, mean, var = ops.column_stats(x, EPS)
    gr, gm, gv = torch.randn_like(r), torch.randn_like(mean), torch.randn_like(var)
    out = [
        ("gram", ft.gram(x, True), ops.gram(x, True)),
        ("gram_pullback", ft.gram_pullback(x, a, beta), ops.gram_pullback(x, a, beta)),
        ("stats", ft.concentration_stats(x, 3.0, EPS, JITTER, RHO_MAX),
         ops.concentration_stats(x, 3.0, EPS, JITTER, RHO_MAX)),
        ("normalize", ft.normalize(x, EPS), ops.normalize(x, EPS)),
        ("normalize_pullback", ft.normalize_pullback(x, g, EPS), ops.normalize_pullback(x, g, EPS)),
        ("column_stats", ft.column_stats(x, EPS), (r, mean, var)),
        ("column_stats_pullback", ft.column_stats_pullback(x, r, mean, gr, gm, gv, EPS),
         ops.column_stats_pullback(x, r, mean, gr, gm, gv, EPS)),
    ]
    for head in HEADS:
        args = (head, EPS, JITTER, 0.0, RHO_MAX)
        out.append((head, ft.gram_loss(x, *args), ops.gram_loss(x, *args)))
    return out


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DT.get)
def test_strided_input(layout, dtype):
    x = make_x(3, 5, 37, dtype, seed=11, layout=layout)
    assert not x.is_contiguous() and x.stride(2) == 1
    for name, actual, expected in _all_ops(x):
        check(actual, expected, acc_tol(dtype), f"{layout} {name}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DT.get)
def test_empty_batch(dtype):
    x = torch.empty(0, 4, 6, dtype=dtype)
    for name, actual, expected in _all_ops(x):
        check(actual, expected, acc_tol(dtype), f"B=0 {name}")


def test_zero_and_duplicate_rows():
    """Zero rows (below the norm floor), duplicate rows (DPP near singular, max ties) and fully aligned
    rows (rho above rho_max), all finite and equal to the CPU ops."""
    x = make_x(4, 5, 23, torch.float64, seed=13)
    x[0, 1] = 0
    x[0, 3] = 0
    x[1, 2] = x[1, 0]
    x[1, 4] = x[1, 0]
    x[2] = x[2, 0]  # all rows equal: rho = 1 > rho_max
    x[3, 1] = -x[3, 0]  # cancelling pairs: rho = 0 (below kRhoFloor)
    x[3, 3] = -x[3, 2]
    x[3, 4] = 0
    for name, actual, expected in _all_ops(x):
        # -log det of a near-singular C amplifies rounding by cond(C + jitter I) ~ n / jitter
        check(actual, expected, (1e-8, 1e-10), f"degenerate {name}")
        for t in (actual if isinstance(actual, tuple) else (actual,)):
            assert torch.isfinite(t).all(), f"degenerate {name}: non-finite output"
    # the same in fp32, against the CPU op where the result is well conditioned, finite everywhere
    x32 = x.float()
    for name, actual, expected in _all_ops(x32):
        for t in (actual if isinstance(actual, tuple) else (actual,)):
            assert torch.isfinite(t).all(), f"degenerate fp32 {name}: non-finite output"
        if name not in ("dpp", "stats", "kappa", "mean_penalty"):
            check(actual, expected, (1e-4, 1e-5), f"degenerate fp32 {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DT.get)
def test_nan_input(dtype):
    """A NaN entry makes that input's loss NaN (and its A, beta), leaves the other inputs alone."""
    x = make_x(3, 4, 10, dtype, seed=17)
    x[1, 2, 5] = math.nan
    for name, actual, expected in _all_ops(x):
        check(actual, expected, acc_tol(dtype), f"NaN {name}")
        if name in HEADS:
            loss, a, beta = actual
            assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all(), f"{name}: {loss}"
            assert torch.isnan(a[1]).all() and torch.isfinite(a[[0, 2]]).all()
            assert torch.isnan(beta[1]).all()
    stats = ft.concentration_stats(x, 2.0, EPS, JITTER, RHO_MAX)
    assert torch.isnan(stats[1]).all() and torch.isfinite(stats[[0, 2]]).all()


def test_inf_input():
    x = make_x(2, 3, 8, torch.float64, seed=19)
    x[0, 1, 2] = math.inf
    for name, actual, expected in _all_ops(x):
        check(actual, expected, ACC_TOL[torch.float64], f"Inf {name}")


# ---------------------------------------------------------------------------------------------------
# The public API on backend='triton' (the fastdiv_triton op namespace): values against backend='cpu',
# float64 gradcheck through the Triton pullbacks, torch.library.opcheck and torch.compile.
# ---------------------------------------------------------------------------------------------------
PUBLIC_LOSSES = ["dpp_loss", "mean_cosine_loss", "kappa_loss", "max_cosine_loss", "smoothmax_cosine_loss",
                 "gal_loss", "mean_penalty", "sparsity_penalty", "variance_penalty"]


def _x64(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", PUBLIC_LOSSES)
def test_public_loss_on_triton_backend(name):
    fn = getattr(fastdiv, name)
    x = _x64(3, 4, 2, 5, seed=7)  # multi-dim features
    for sample_dim, grads in ((1, x), (0, x.transpose(0, 1))):
        got = fn(grads, reduction="none", sample_dim=sample_dim, backend="triton")
        want = fn(grads, reduction="none", sample_dim=sample_dim, backend="cpu")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    leaf = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fn(t, reduction="none", backend="triton"), (leaf,))


def test_public_rows_and_stats_on_triton_backend():
    x = _x64(2, 5, 13, seed=8)
    leaf = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fastdiv.normalize(t, backend="triton"), (leaf,))
    assert torch.autograd.gradcheck(lambda t: fastdiv.cosine_gram(t, backend="triton"), (leaf,))
    got = fastdiv.concentration_stats(x, backend="triton")
    want = fastdiv.concentration_stats(x, backend="cpu")
    for field in got._fields:
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-10, atol=1e-12)


def test_triton_namespace_opcheck_and_compile():
    x = torch.randn(3, 4, 9, requires_grad=True)
    t = torch.ops.fastdiv_triton
    for op, args in [(t.gram_loss.default, (x, "dpp", EPS, JITTER, 0.0, RHO_MAX)),
                     (t.gram_loss.default, (x, "sparsity", EPS, JITTER, 0.0, RHO_MAX)),
                     (t.gram.default, (x, True)), (t.normalize.default, (x, EPS)),
                     (t.column_stats.default, (x, EPS)),
                     (t.concentration_stats.default, (x.detach(), 1.0, EPS, JITTER, RHO_MAX)),
                     (t.gram_pullback.default, (x.detach(), torch.randn(3, 4, 4), None, torch.randn(1).expand(3)))]:
        torch.library.opcheck(op, args)
    f = torch.compile(lambda g: fastdiv.dpp_loss(g, backend="triton") + fastdiv.variance_penalty(g, backend="triton"),
                      fullgraph=True, backend="aot_eager")
    value = f(x)
    (grad,) = torch.autograd.grad(value, x)
    leaf = x.detach().clone().requires_grad_()
    eager = fastdiv.dpp_loss(leaf, backend="cpu") + fastdiv.variance_penalty(leaf, backend="cpu")
    eager.backward()
    torch.testing.assert_close(value, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# On a real GPU (skipped elsewhere): the compiled Triton kernels on CUDA tensors against the C++ CPU ops.
# Run without the interpreter: TRITON_INTERPRET=0 python -m pytest tests/test_triton.py -k cuda
# ---------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA device and TRITON_INTERPRET unset (compiled Triton)")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=lambda d: DT[d])
@pytest.mark.parametrize("name", PUBLIC_LOSSES)
def test_cuda_losses_match_cpu(name, dtype):
    fn = getattr(fastdiv, name)
    x = _x64(64, 10, 3, 32, 32, seed=9).to(dtype)
    leaf_gpu = x.cuda().requires_grad_()
    got = fn(leaf_gpu, reduction="none", backend="triton")
    got.sum().backward()
    leaf_cpu = x.clone().requires_grad_()
    want = fn(leaf_cpu, reduction="none", backend="cpu")
    want.sum().backward()
    rtol, atol = ACC_TOL.get(dtype, ACC_TOL[torch.float32])
    torch.testing.assert_close(got.cpu(), want, rtol=rtol * 10, atol=atol * 10)
    out_rtol, out_atol = OUT_TOL[dtype]
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(leaf_gpu.grad.cpu(), leaf_cpu.grad, rtol=out_rtol * 10,
                               atol=out_atol * 10 * leaf_cpu.grad.abs().max().item() + 1e-12 * scale)


@needs_cuda
def test_cuda_stats_and_rows_match_cpu():
    x = _x64(32, 7, 1000, seed=10).float()
    got = fastdiv.concentration_stats(x.cuda(), backend="triton")
    want = fastdiv.concentration_stats(x, backend="cpu")
    for field in got._fields:
        torch.testing.assert_close(getattr(got, field).cpu(), getattr(want, field), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fastdiv.normalize(x.cuda(), backend="triton").cpu(),
                               fastdiv.normalize(x, backend="cpu"), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The fused forward (fastdiv/triton/fused.py): for n <= 32 one launch per gram_loss / concentration_stats
# call computes the Gram, the resultant and the n x n head; n > 32 keeps the Gram kernel + torch heads.
# ------------------------------------------------------------------------------------------------
from fastdiv.triton import fused as ft_fused  # noqa: E402

# BLOCK_N = 2, 4, 16, 32, 32: no padding, padding rows/columns, and the largest fused tile (full and not)
FUSED_N = [2, 3, 10, 17, 32]


@pytest.mark.parametrize("n", FUSED_N + [33], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("head", HEADS)
def test_fused_gram_loss(head, n):
    """Every head against the C++ op, fp64 to fp64 rounding and fp32 to fp32 rounding; n = 33 is the
    two-launch fallback. d = 2 n + 3 keeps C + jitter I well conditioned (for n > d its condition number
    is ~ n / jitter and fp32 rounding of the Gram moves the DPP coefficients by ~1e-3 on every backend)."""
    assert ft_fused.can_fuse(n) == (n <= 32)
    args = (head, EPS, JITTER, 0.0, RHO_MAX)
    for dtype in (torch.float64, torch.float32):
        x = make_x(2, n, 2 * n + 3, dtype, seed=100 + n)
        x0 = x.clone()
        check(ft.gram_loss(x, *args), ops.gram_loss(x, *args), acc_tol(dtype), f"{head} n={n} {DT[dtype]}")
        assert torch.equal(x, x0), "the input was modified"


@pytest.mark.parametrize("n", FUSED_N + [33], ids=lambda n: f"n{n}")
def test_fused_concentration_stats(n):
    q = (1.0, 2.5, math.inf)[n % 3]
    for dtype in (torch.float64, torch.float32):
        x = make_x(2, n, 2 * n + 3, dtype, seed=200 + n)
        check(ft.concentration_stats(x, q, EPS, JITTER, RHO_MAX), ops.concentration_stats(x, q, EPS, JITTER, RHO_MAX),
              acc_tol(dtype), f"stats n={n} q={q} {DT[dtype]}")


def _special_batch(dtype):
    """[5, 6, 11]: 0 NaN entry, 1 two zero rows, 2 duplicate rows, 3 exact ties, 4 plain."""
    x = make_x(5, 6, 11, torch.float64, seed=31)
    x[0, 2, 4] = math.nan
    x[1, 1] = 0
    x[1, 4] = 0
    x[2, 3] = x[2, 0]
    x[2, 5] = x[2, 0]
    x[3] = 0  # rows e0, e0, e1, e0, 2 e2, -e1: C_01 = C_03 = C_13 = 1 exactly, the max head takes (0, 1)
    x[3, [0, 1, 3], 0] = 1
    x[3, 2, 1] = 1
    x[3, 4, 2] = 2
    x[3, 5, 1] = -1
    return x.to(dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DT.get)
def test_fused_special_rows(dtype):
    """NaN input (that input's loss, A and beta all NaN, the others untouched), zero rows (below the norm
    floor: no direction, no gradient), duplicate rows (DPP near singular but finite) and exact ties of
    the max cosine (the first pair in row-major order, as the C++ loop), against the C++ op."""
    x = _special_batch(dtype)
    # cond(C + jitter I) ~ n / jitter for the duplicates: fp64 rounding times 1e5; in fp32 that is
    # ~1e-2, so there the DPP values are only checked for being finite
    tol = (1e-8, 1e-10) if dtype == torch.float64 else (1e-4, 1e-5)
    for head in HEADS:
        args = (head, EPS, JITTER, 0.0, RHO_MAX)
        got = ft.gram_loss(x, *args)
        want = ops.gram_loss(x, *args)
        if dtype == torch.float64 or head != "dpp":
            check(got, want, tol, f"special {head}")
        loss, a, beta = got
        assert torch.isnan(loss[0]) and torch.isnan(a[0]).all() and torch.isnan(beta[0]).all(), head
        assert torch.isfinite(loss[1:]).all() and torch.isfinite(a[1:]).all() and torch.isfinite(beta[1:]).all(), head
        if head != "sparsity":  # zero rows get no coefficients (sparsity: beta is -inv_r / n = 0 there too)
            assert (a[1, [1, 4]] == 0).all() and (a[1, :, [1, 4]] == 0).all(), head
        if head == "max":
            off = a[3] - torch.diag_embed(torch.diagonal(a[3]))
            assert off.nonzero().tolist() == [[0, 1], [1, 0]], off
    got = ft.concentration_stats(x, 2.0, EPS, JITTER, RHO_MAX)
    want = ops.concentration_stats(x, 2.0, EPS, JITTER, RHO_MAX)
    if dtype == torch.float64:
        check(got, want, tol, "special stats")
    else:
        check(got[:, :5].contiguous(), want[:, :5].contiguous(), tol, "special stats (no dpp)")
    assert torch.isnan(got[0]).all() and torch.isfinite(got[1:]).all()


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_fused_strided_input(layout):
    """Strides on B and n go to the kernel as they are (no copy, the input untouched)."""
    x = make_x(2, 9, 21, torch.float64, seed=41, layout=layout)
    assert not x.is_contiguous() and x.stride(2) == 1
    x0 = x.clone()
    for head in HEADS:
        args = (head, EPS, JITTER, 0.0, RHO_MAX)
        check(ft.gram_loss(x, *args), ops.gram_loss(x, *args), ACC_TOL[torch.float64], f"{layout} {head}")
    check(ft.concentration_stats(x, 3.0, EPS, JITTER, RHO_MAX), ops.concentration_stats(x, 3.0, EPS, JITTER, RHO_MAX),
          ACC_TOL[torch.float64], f"{layout} stats")
    assert torch.equal(x, x0)


def test_fused_one_launch(monkeypatch):
    """n <= 32: exactly one Triton kernel launch per gram_loss / concentration_stats call, through the
    public op namespace. What is counted: every `kernel[grid](...)` of any @triton.jit kernel in the
    process (the kernel class's run method, patched), by kernel name. Not counted: the torch allocations of
    the outputs, and above n = 32 the float64 torch heads after the Triton kernels (on a GPU those are
    further CUDA kernels). Also: repeated calls give the same bits (no atomics)."""
    launches = []
    cls = type(ft_fused._fused_kernel)
    run = cls.run

    def counting_run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", counting_run)
    t = torch.ops.fastdiv_triton

    def launched(fn, *args):
        launches.clear()
        out = fn(*args)
        return out, list(launches)

    for n in (3, 32):
        x = make_x(2, n, 5, torch.float64, seed=n)
        for head in HEADS:
            args = (x, head, EPS, JITTER, 0.0, RHO_MAX)
            first, names = launched(t.gram_loss, *args)
            assert names == ["_fused_kernel"], (head, n, names)
            again, _ = launched(t.gram_loss, *args)
            assert all(torch.equal(u, v) for u, v in zip(first, again)), f"{head}: not deterministic"
        _, names = launched(t.concentration_stats, x, 1.0, EPS, JITTER, RHO_MAX)
        assert names == ["_fused_kernel"], ("stats", n, names)
    _, names = launched(t.gram_loss, torch.empty(0, 4, 5, dtype=torch.float64), "dpp", EPS, JITTER, 0.0, RHO_MAX)
    assert names == []
    # the fallback above 32 samples: the Gram kernel, plus the resultant kernel when the head needs it
    x = make_x(1, 33, 5, torch.float64, seed=33)
    for head, expected in (("dpp", ["_gram_kernel"]), ("kappa", ["_gram_kernel", "_resultant_kernel"])):
        _, names = launched(t.gram_loss, x, head, EPS, JITTER, 0.0, RHO_MAX)
        assert names == expected, (head, names)
    _, names = launched(t.concentration_stats, x, 1.0, EPS, JITTER, RHO_MAX)
    assert names == ["_gram_kernel", "_resultant_kernel"], names
