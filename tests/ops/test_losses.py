"""The public ops of every backend: each diversity loss of tests/conftest.py's LOSS_CASES (the Gram-family heads
and the variance penalties), normalize, cosine_gram and concentration_stats, through fastdiv's public API.

The common matrix, over the backend parameter of tests/ops/_helpers.py: float64 gradcheck; values and
gradients against the float64 reference in fp64 (~1e-9) and, in fp32/bf16/fp16, by the parity rule of
tests/conftest.py; shapes (n, D, many inputs, multi-dim features, the GPU grid); non-contiguous layouts and
sample_dim=0; the empty batch; degenerate, zero, duplicate and non-finite rows; inputs never modified;
argument errors; output dtypes and reductions; double backward; torch.compile(fullgraph=True); bitwise
determinism and the CPU thread count. The raw ops behind them are in test_gram.py and test_rows.py.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastdiv
from fastdiv import reference

from ._helpers import (
    ACC_TOL,
    CPU_BACKEND,
    EPS,
    JITTER,
    NAMESPACES,
    OUT_TOL,
    RHO_MAX,
    acc_of,
    backends,
    close,
    device_of,
    gpu_randn,
    on_device,
    requires_extension,
)
from conftest import (
    BACKENDS,
    LOSS_BY_ID,
    LOSS_CASES,
    LOSS_IDS,
    LOWP_DTYPES,
    STAT_FIELDS,
    assert_as_accurate,
    assert_close64,
    assert_parity,
    dtype_id,
    gamma,
    randn,
    unit_roundoff,
    upstream_weights,
    value_and_grad,
)

#: the backends the CPU-sized tests run on, and those of the tests sized for a GPU
CPU_SIDE = backends("cpu", "torch")
GPU_SIDE = backends("cuda", "triton:gpu")
#: both: a fused backend against the reference where the test is cheap on any device
EVERY = backends("cpu", "torch", "cuda", "triton:gpu")
#: the fused backends that are compared with the reference (the reference itself excluded)
FUSED = backends("cpu", "cuda", "triton:gpu")

ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def shape_id(shape) -> str:
    return "x".join(str(s) for s in shape)


def loss_fn(case, backend, **kw):
    """``x -> case(x, backend=backend, reduction='none', **kw)``."""
    kw.setdefault("reduction", "none")
    return lambda t: case(t, backend=backend, **kw)


def fused_and_reference(case, x, weights=None, backend="cpu", **kw):
    """(value, grad) on the backend (on its device) and on the reference for the same CPU input."""
    fused = value_and_grad(on_device(loss_fn(case, backend, **kw), backend), x, weights)
    ref = value_and_grad(loss_fn(case, "torch", **kw), x, weights)
    return fused, ref


# =====================================================================================================
# 1. float64 gradcheck of every loss, normalize and cosine_gram on both backends
# =====================================================================================================

GRADCHECK_LAYOUTS = {
    # id: (shape, kwargs)
    "B2-n4-D5": ((2, 4, 5), dict(reduction="none")),
    "sample_dim0-n3-B2-2x3-mean": ((3, 2, 2, 3), dict(reduction="mean", sample_dim=0)),
    "B2-n2-D3-sum": ((2, 2, 3), dict(reduction="sum")),
}


@pytest.mark.parametrize("layout", list(GRADCHECK_LAYOUTS), ids=list(GRADCHECK_LAYOUTS))
@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_gradcheck_losses(case, backend, layout):
    shape, kw = GRADCHECK_LAYOUTS[layout]
    x = randn(*shape, seed=11).to(device_of(backend)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: case(t, backend=backend, **kw), (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


# Non-default hyperparameters change the kernels' code paths (p, rho_max clamp, jitter, temperature).
GRADCHECK_PARAMS = [
    ("dpp", dict(jitter=0.05)),
    ("kappa", dict(p=2.5)),
    ("kappa", dict(p=40.0, rho_max=0.9)),
    ("var-softmin", dict(temperature=0.3)),
    ("var-softmin", dict(temperature=0.01)),
]


@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize("case_id,kw", GRADCHECK_PARAMS, ids=[f"{c}-{kw}" for c, kw in GRADCHECK_PARAMS])
def test_gradcheck_loss_hyperparameters(case_id, kw, backend):
    x = randn(2, 4, 5, seed=12).to(device_of(backend)).requires_grad_()
    case = LOSS_BY_ID[case_id]
    assert torch.autograd.gradcheck(lambda t: case(t, backend=backend, reduction="none", **kw), (x,),
                                    atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_SIDE)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_gradcheck_rows_below_eps(case, backend):
    """Rows with 0 < ||g|| < eps take the other branch of u = g / max(||g||, eps) (r = eps constant)."""
    x = randn(2, 4, 5, seed=13)
    x[:, 1] *= 1e-4  # ||row|| ~ 2e-4 < eps = 1e-2
    x = x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: case(t, backend=backend, reduction="none", eps=1e-2), (x,),
                                    eps=1e-8, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sample_dim", [1, 0])
@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize("fn", [fastdiv.normalize, fastdiv.cosine_gram], ids=["normalize", "cosine_gram"])
def test_gradcheck_normalize_and_cosine_gram(fn, backend, sample_dim):
    x = randn(3, 2, 2, 3, seed=14).to(device_of(backend)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fn(t, backend=backend, sample_dim=sample_dim), (x,), atol=1e-7,
                                    rtol=1e-5), fn.__name__


def test_torch_backend_supports_double_backward():
    """The reference path is plain autograd, so create_graph works there (the documented fallback for
    double backward, which the fused kernels reject: test_double_backward_raises)."""
    x = randn(2, 4, 5, seed=15).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: fastdiv.dpp_loss(t, backend="torch", reduction="none"), (x,))


# =====================================================================================================
# 2. parity of the compiled kernels with the reference in fp32 / bf16 / fp16
# =====================================================================================================

PARITY_SHAPES = [(4, 5, 7), (3, 10, 100), (2, 3, 1000), (5, 4, 4099)]


@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", backends("cpu"))
def test_parity_reduced_precision(backend, case, dtype, shape):
    x64 = randn(*shape, seed=sum(shape))
    w = upstream_weights(shape[0])
    truth = value_and_grad(loss_fn(case, "torch"), x64, w)
    xl = x64.to(dtype)
    ref = value_and_grad(loss_fn(case, "torch"), xl, w)
    fused = value_and_grad(on_device(loss_fn(case, backend), backend), xl, w)
    assert_parity(fused[0], ref[0], truth[0], dtype, f"{case.id} value")
    assert_parity(fused[1], ref[1], truth[1], dtype, f"{case.id} gradient")


@pytest.mark.parametrize("shape", [(4, 5, 7), (3, 10, 1000)], ids=shape_id)
@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fn", [fastdiv.normalize, fastdiv.cosine_gram], ids=["normalize", "cosine_gram"])
@pytest.mark.parametrize("backend", backends("cpu"))
def test_parity_reduced_precision_normalize_cosine_gram(backend, fn, dtype, shape):
    x64 = randn(*shape, seed=7)
    out_shape = fn(x64[:1], backend="torch").shape[1:]
    gen = torch.Generator().manual_seed(3)
    w = torch.rand((shape[0],) + tuple(out_shape), generator=gen, dtype=torch.float64) + 0.5
    truth = value_and_grad(lambda t: fn(t, backend="torch"), x64, w)
    ref = value_and_grad(lambda t: fn(t, backend="torch"), x64.to(dtype), w)
    fused = value_and_grad(on_device(lambda t: fn(t, backend=backend), backend), x64.to(dtype), w)
    assert_parity(fused[0], ref[0], truth[0], dtype, "value")
    assert_parity(fused[1], ref[1], truth[1], dtype, "gradient")


@pytest.mark.parametrize("q", [1.0, 2.0, 3.0, math.inf], ids=lambda q: f"q={q}")
@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", backends("cpu"))
def test_parity_reduced_precision_concentration_stats(backend, dtype, q):
    x64 = randn(3, 10, 700, seed=8)
    truth = fastdiv.concentration_stats(x64, q=q, backend="torch")
    ref = fastdiv.concentration_stats(x64.to(dtype), q=q, backend="torch")
    fused = fastdiv.concentration_stats(x64.to(dtype).to(device_of(backend)), q=q, backend=backend)
    for field in STAT_FIELDS:
        assert_parity(getattr(fused, field).cpu(), getattr(ref, field), getattr(truth, field), dtype, field)


# Finite rows at any scale (docs/losses.md): fp32 / bf16 squares overflow from |g| ~ 2^64 and flush to zero
# below ~2^-75, fp16 squares never leave fp32's range. Per dtype, the exponents k of the scales 2^k tested
# (2^100 ~ 1.3e30, 2^63 ~ 9.2e18, 2^-100 ~ 7.9e-31); fp16's keep the inputs and their gradients (~2^-k)
# normal fp16 numbers.
SCALE_EXPONENTS = {torch.float32: (-100, -80, 63, 100), torch.bfloat16: (-100, 63, 100), torch.float16: (-6, 6)}
#: a norm floor below the norms of the tiniest rows (~2^-100 sqrt(D) ~ 5e-30): they keep their direction
TINY_EPS = 1e-36


def row_factors(k: int) -> torch.Tensor:
    """[4, 5, 1] float64 powers of two: input 0 all rows at 2^k, input 1 one row at 2^k beside rows at 1,
    input 2 rows at 2^k and 2^-k mixed, input 3 at 1."""
    f = torch.ones(4, 5, 1, dtype=torch.float64)
    f[0], f[1, 2], f[2, ::2], f[2, 1::2] = 2.0**k, 2.0**k, 2.0**k, 2.0**-k
    return f


def scale_cases(backend: str) -> list:
    """(name, per-input function) of every loss, normalize and cosine_gram on ``backend``, floor TINY_EPS."""
    out = [(c.id, lambda t, c=c: c(t, backend=backend, reduction="none", eps=TINY_EPS)) for c in LOSS_CASES]
    return out + [(fn.__name__, lambda t, fn=fn: fn(t, backend=backend, eps=TINY_EPS))
                  for fn in (fastdiv.normalize, fastdiv.cosine_gram)]


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", backends("cpu", "torch", "triton:cpu", "cuda"))
def test_rows_at_any_scale(backend, dtype):
    """Rows scaled by powers of two whose squares leave the accumulation range (some rows of an input
    scaled, others not): every loss and its gradient, normalize, cosine_gram and the statistics are as
    accurate against the fp64 results on the same data as at scale 1 (the parity rule of
    assert_as_accurate); gradients are compared times the row scale, as they scale with 1 / scale."""
    base = randn(4, 5, 37, seed=81).to(dtype)
    gen = torch.Generator().manual_seed(82)
    dev = device_of(backend)
    for k in SCALE_EXPONENTS[dtype]:
        f = row_factors(k)
        x = (base.double() * f).to(dtype)
        assert torch.isfinite(x).all() and (x != 0).any(-1).all()
        for (name, fn), (_, truth_fn) in zip(scale_cases(backend), scale_cases("torch")):
            out_shape = tuple(truth_fn(base[:1].double()).shape[1:])
            w = torch.rand((4, *out_shape), generator=gen, dtype=torch.float64) + 0.5
            got, ref = value_and_grad(on_device(fn, backend), x, w), value_and_grad(on_device(fn, backend), base, w)
            t_got, t_ref = value_and_grad(truth_fn, x.double(), w), value_and_grad(truth_fn, base.double(), w)
            what = f"{name} 2^{k} {dtype_id(dtype)}"
            assert_as_accurate(got[0], t_got[0], ref[0], t_ref[0], dtype, f"{what} value")
            assert_as_accurate(got[1] * f, t_got[1] * f, ref[1], t_ref[1], dtype, f"{what} gradient")
        for q in (1.0, math.inf):
            got = fastdiv.concentration_stats(x.to(dev), q=q, eps=TINY_EPS, backend=backend)
            ref = fastdiv.concentration_stats(base.to(dev), q=q, eps=TINY_EPS, backend=backend)
            t_got = fastdiv.concentration_stats(x.double(), q=q, eps=TINY_EPS, backend="torch")
            t_ref = fastdiv.concentration_stats(base.double(), q=q, eps=TINY_EPS, backend="torch")
            for field in STAT_FIELDS:
                assert_as_accurate(getattr(got, field).cpu(), getattr(t_got, field), getattr(ref, field).cpu(),
                                   getattr(t_ref, field), dtype, f"{field} q={q} 2^{k} {dtype_id(dtype)}")


# =====================================================================================================
# 3. shapes: primes and non-powers of two in n and D, B = 0, several feature dims
# =====================================================================================================


def check_loss(case, backend: str, x64: torch.Tensor, dtypes, **kw) -> None:
    """Per-input values and the input gradient (distinct upstream weight per input) of ``case`` on the
    backend (on its device) against the reference on the CPU: fp64 to ~1e-9, other dtypes by the parity rule."""
    w = upstream_weights(x64.shape[0])
    truth = value_and_grad(loss_fn(case, "torch", **kw), x64, w)
    for dtype in dtypes:
        xl = x64.to(dtype)
        got = value_and_grad(on_device(loss_fn(case, backend, **kw), backend), xl, w)
        what = f"{case.id} on {backend}, {dtype_id(dtype)}"
        if dtype == torch.float64:
            assert_close64(got[0], truth[0], f"{what} value")
            assert_close64(got[1], truth[1], f"{what} gradient", rtol=1e-8)
        else:
            ref = value_and_grad(loss_fn(case, "torch", **kw), xl, w)
            assert_parity(got[0], ref[0], truth[0], dtype, f"{what} value")
            assert_parity(got[1], ref[1], truth[1], dtype, f"{what} gradient")


def check_fp64_and_fp32(case, x64, backend="cpu", **kw):
    """backend == reference in fp64 (values and gradients), and the fp32 parity rule."""
    check_loss(case, backend, x64, [torch.float64, torch.float32], **kw)


@pytest.mark.parametrize("n", [2, 3, 5, 7, 10, 17, 32], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", backends("cpu"))
def test_shapes_number_of_samples(backend, case, n):
    check_fp64_and_fp32(case, randn(3, n, 37, seed=n), backend)


# 2047/2048/2049 straddle the kernels' column tile (kTile in fastdiv/csrc/cpu/kernels.h; 511-513 the former
# one); 4099 with B = 5 splits the batch over several parallel tasks; 100_000 is a long accumulation.
D_VALUES = [1, 2, 7, 31, 33, 100, 511, 512, 513, 1000, 2047, 2048, 2049, 4099, 100_000]


@pytest.mark.parametrize("d", D_VALUES, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", backends("cpu"))
def test_shapes_feature_dim(backend, case, d):
    b = 1 if d >= 100_000 else 5
    # n <= D keeps the cosine matrix full rank (n > D makes R_DPP ill-conditioned: ~1/jitter sized
    # terms that cancel); D = 1 is rank one whatever n is.
    n = 2 if d == 2 else 3
    if case.id == "dpp" and d == 1:
        check_dpp_rank_one(backend, randn(b, n, d, seed=d))
        return
    check_fp64_and_fp32(case, randn(b, n, d, seed=d), backend)


def check_dpp_rank_one(backend: str, x64: torch.Tensor) -> None:
    """R_DPP of linearly dependent rows (D = 1): the true gradient is 0, but (C + jitter I)^-1 has
    entries ~1/jitter. The fused pullback forms dX = A X with A rounded to fp32, so those terms cancel
    only up to ~eps32 / (jitter * r_i); the reference's projection (g - <g,u>u) / r cancels exactly in
    one dimension. fp64 must still match exactly, and fp32 must stay inside that conditioning bound."""
    case = LOSS_BY_ID["dpp"]
    check_loss(case, backend, x64, [torch.float64])
    w = upstream_weights(x64.shape[0])
    truth = value_and_grad(loss_fn(case, "torch"), x64, w)
    x32 = x64.float()
    got = value_and_grad(on_device(loss_fn(case, backend), backend), x32, w)
    assert_parity(got[0], value_and_grad(loss_fn(case, "torch"), x32, w)[0], truth[0], torch.float32, "dpp fp32 value")
    bound = 100 * torch.finfo(torch.float32).eps / 1e-4 / x64.abs() * w.abs().max()
    err = (got[1] - truth[1]).abs()
    assert (err <= bound).all(), f"dpp fp32 gradient error {err.max():.3e} above the bound {bound.min():.3e}"


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", backends("cpu"))
def test_shapes_many_inputs_threaded(backend, case):
    """Enough inputs for at::parallel_for to split the batch: every input must still get its own loss."""
    x = randn(67, 5, 600, seed=2)
    check_fp64_and_fp32(case, x, backend)
    x = x.to(device_of(backend))
    per_input = case(x, backend=backend, reduction="none")
    one_by_one = torch.cat([case(x[b:b + 1], backend=backend, reduction="none") for b in range(x.shape[0])])
    assert torch.equal(per_input, one_by_one)


@pytest.mark.parametrize("backend", CPU_SIDE)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_multi_dim_features_equal_flattened(case, backend):
    x = randn(2, 4, 3, 5, 7, seed=4)
    w = upstream_weights(2)
    v, g = value_and_grad(loss_fn(case, backend), x, w)
    vf, gf = value_and_grad(loss_fn(case, backend), x.flatten(2), w)
    assert g.shape == x.shape
    assert_close64(v, vf, "value")
    assert_close64(g.flatten(2), gf, "gradient")
    check_fp64_and_fp32(case, x)


@pytest.mark.parametrize("backend", CPU_SIDE)
def test_multi_dim_features_normalize_and_cosine_gram(backend):
    x = randn(2, 4, 3, 5, 7, seed=5)
    u = fastdiv.normalize(x, backend=backend)
    assert u.shape == x.shape
    assert_close64(u, reference.normalize(x), "normalize")
    assert_close64(u.flatten(2).norm(dim=-1), torch.ones(2, 4, dtype=torch.float64), "unit norms")
    c = fastdiv.cosine_gram(x, backend=backend)
    assert c.shape == (2, 4, 4)
    assert_close64(c, reference.cosine_gram(x), "cosine_gram")


# the reference's u.var over an empty batch warns (harmless: the result is empty)
@pytest.mark.filterwarnings("ignore:var\\(\\):UserWarning")
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_empty_batch(case, backend, reduction):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.zeros(0, 4, 3, 5, dtype=dtype, device=device_of(backend), requires_grad=True)
        out = case(x, backend=backend, reduction=reduction)
        assert out.dtype == acc_of(dtype) and out.device == x.device
        if reduction == "none":
            assert out.shape == (0,)
        else:
            assert out.shape == ()
            assert out.item() == 0.0
        out.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("sample_dim", [1, 0])
@pytest.mark.parametrize("backend", EVERY)
def test_empty_batch_normalize_cosine_gram_stats(backend, sample_dim):
    assert_empty_batch_ops(backend, sample_dim, device_of(backend))


def assert_empty_batch_ops(backend, sample_dim, device):
    """normalize, cosine_gram (with backward) and the statistics on an empty batch keep their shapes."""
    x = torch.zeros((0, 3, 4) if sample_dim == 1 else (3, 0, 4), device=device, requires_grad=True)
    u = fastdiv.normalize(x, backend=backend, sample_dim=sample_dim)
    assert u.shape == x.shape
    c = fastdiv.cosine_gram(x, backend=backend, sample_dim=sample_dim)
    assert c.shape == (0, 3, 3)
    (u.sum() + c.sum()).backward()
    assert x.grad.shape == x.shape
    stats = fastdiv.concentration_stats(x.detach(), backend=backend, sample_dim=sample_dim)
    assert all(getattr(stats, f).shape == (0,) for f in STAT_FIELDS)


# =====================================================================================================
# 4. non-contiguous inputs and sample_dim=0
# =====================================================================================================

B, N, F1, F2 = 3, 5, 4, 6

# name: (shape of the contiguous base tensor, base -> grads view, sample_dim of the view)
LAYOUTS = {
    "slice-n-stride2": ((2 * B, 2 * N, F1, F2), lambda t: t[:B, ::2], 1),
    "slice-batch-and-offset": ((2 * B, 2 * N, F1, F2), lambda t: t[1:2 * B:2, 3:3 + N], 1),
    # [n, B, ...] storage read as [B, n, ...]: the strides of B and n swap, no copy needed
    "transposed-batch": ((N, B, F1, F2), lambda t: t.transpose(0, 1), 1),
    # feature dims not row-major: as_rows must make one copy
    "permuted-features": ((B, N, F2, F1), lambda t: t.permute(0, 1, 3, 2), 1),
    "strided-features": ((B, N, F1, 2 * F2), lambda t: t[..., ::2], 1),
    "expanded-batch": ((1, N, F1, F2), lambda t: t.expand(B, N, F1, F2), 1),
    "sample_dim0": ((N, B, F1, F2), lambda t: t, 0),
    "sample_dim0-noncontiguous": ((2 * N, B, F1, F2), lambda t: t[::2], 0),
    # grads.transpose(0, 1) of a [B, n, ...] tensor
    "sample_dim0-from-transpose": ((B, N, F1, F2), lambda t: t.transpose(0, 1), 0),
}
LAYOUT_IDS = list(LAYOUTS)


def as_batch_first(view: torch.Tensor, sample_dim: int) -> torch.Tensor:
    """The same values as a contiguous [B, n, *features] tensor (differentiable)."""
    return (view.transpose(0, 1) if sample_dim == 0 else view).contiguous()


def layout_case(name: str):
    shape, make_view, sample_dim = LAYOUTS[name]
    base = randn(*shape, seed=21)
    view = make_view(base)
    assert view.shape == ((N, B, F1, F2) if sample_dim == 0 else (B, N, F1, F2))
    if name not in ("transposed-batch", "sample_dim0", "sample_dim0-from-transpose"):
        assert not view.is_contiguous()
    return base, make_view, sample_dim


@pytest.mark.parametrize("name", LAYOUT_IDS)
@pytest.mark.parametrize("backend", CPU_SIDE)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_layouts_losses(case, backend, name):
    """Values and gradients (w.r.t. the base tensor of the view) equal those of the reference on a
    contiguous [B, n, ...] copy."""
    base, make_view, sample_dim = layout_case(name)
    w = upstream_weights(B)
    v, grad = value_and_grad(
        lambda t: case(make_view(t), backend=backend, reduction="none", sample_dim=sample_dim), base, w)
    v_ref, grad_ref = value_and_grad(
        lambda t: case(as_batch_first(make_view(t), sample_dim), backend="torch", reduction="none"), base, w)
    assert_close64(v, v_ref, "value")
    assert_close64(grad, grad_ref, "gradient", rtol=1e-8)
    # same backend, contiguous copy: the layout does not change the numbers
    v_copy = case(as_batch_first(make_view(base), sample_dim), backend=backend, reduction="none")
    assert_close64(v, v_copy, "value vs contiguous copy", rtol=1e-12)


@pytest.mark.parametrize("name", LAYOUT_IDS)
@pytest.mark.parametrize("backend", CPU_SIDE)
def test_layouts_normalize_cosine_gram_stats(backend, name):
    base, make_view, sample_dim = layout_case(name)
    view = make_view(base)
    contiguous = as_batch_first(view, sample_dim)
    u = fastdiv.normalize(view, backend=backend, sample_dim=sample_dim)
    assert u.shape == view.shape  # normalize returns the caller's layout
    assert_close64(as_batch_first(u, sample_dim), reference.normalize(contiguous), "normalize")
    c = fastdiv.cosine_gram(view, backend=backend, sample_dim=sample_dim)
    assert_close64(c, reference.cosine_gram(contiguous), "cosine_gram")
    stats = fastdiv.concentration_stats(view, backend=backend, sample_dim=sample_dim)
    expected = reference.concentration_stats(contiguous)
    for field in STAT_FIELDS:
        assert_close64(getattr(stats, field), getattr(expected, field), field)
    gen = torch.Generator().manual_seed(5)
    wu = torch.rand(u.shape, generator=gen, dtype=torch.float64)
    wc = torch.rand(c.shape, generator=gen, dtype=torch.float64)

    def fused(t):
        v = make_view(t)
        return ((fastdiv.normalize(v, backend=backend, sample_dim=sample_dim) * wu).sum()
                + (fastdiv.cosine_gram(v, backend=backend, sample_dim=sample_dim) * wc).sum())

    def ref(t):
        v = make_view(t)
        wu_b = wu.transpose(0, 1) if sample_dim == 0 else wu
        return (reference.normalize(as_batch_first(v, sample_dim)) * wu_b).sum() + (
            reference.cosine_gram(as_batch_first(v, sample_dim)) * wc).sum()

    assert_close64(value_and_grad(fused, base)[1], value_and_grad(ref, base)[1], "gradient", rtol=1e-8)


@pytest.mark.parametrize("backend", CPU_SIDE)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_sample_dim0_equals_transpose(case, backend):
    """The sample_dim contract: loss(grads.transpose(0, 1), sample_dim=0) == loss(grads)."""
    grads = randn(4, 6, 9, seed=41)
    a = case(grads, backend=backend, reduction="none")
    b = case(grads.transpose(0, 1), backend=backend, reduction="none", sample_dim=0)
    assert_close64(b, a, "sample_dim=0")


# =====================================================================================================
# 5. degenerate inputs, non-finite inputs, inputs never modified
# =====================================================================================================


def degenerate(kind: str, dtype: torch.dtype) -> torch.Tensor:
    """[2, n, 6] inputs of each degenerate kind (n = 4 unless the kind fixes it)."""
    u = randn(2, 1, 6, seed=51)
    scales = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)[None, :, None]
    if kind == "zero-row":
        x = randn(2, 4, 6, seed=52)
        x[:, 1] = 0
    elif kind == "two-zero-rows":
        x = randn(2, 4, 6, seed=53)
        x[:, 0] = 0
        x[:, 3] = 0
    elif kind == "all-zero":
        x = torch.zeros(2, 4, 6, dtype=torch.float64)
    elif kind == "duplicate-rows":
        x = randn(2, 4, 6, seed=54)
        x[:, 2] = x[:, 0]
    elif kind == "aligned":  # equal up to positive scale
        x = u * scales
    elif kind == "identical":
        x = u.expand(2, 4, 6).clone()
    elif kind == "anti-aligned-pair":
        x = torch.cat([u, -u], dim=1)
    elif kind == "anti-aligned-4":
        x = torch.cat([u, -2 * u, 0.5 * u, -u], dim=1)
    elif kind == "tiny-row":  # 0 < ||row|| < eps
        x = randn(2, 4, 6, seed=55)
        x[:, 2] *= 1e-14
    else:
        raise AssertionError(kind)
    return x.to(dtype)


DEGENERATE = ["zero-row", "two-zero-rows", "all-zero", "duplicate-rows", "aligned", "identical",
              "anti-aligned-pair", "anti-aligned-4", "tiny-row"]
# Rows below the norm floor in fp16 (zero rows; a row of norm 1e-14 flushes to zero) have their own
# tests (test_zero_rows_fp16_*): fp16 cannot hold eps = 1e-12 nor the ~1/eps derivative there. The
# reference (torch backend) is checked where it is finite, fp64 and fp32: in bf16/fp16 it computes the
# cosines in half precision, and for aligned rows they exceed 1 by more than the jitter (log det NaN).
FP16_BELOW_FLOOR = ("zero-row", "two-zero-rows", "all-zero", "tiny-row")
DEGENERATE_PARAMS = [
    pytest.param(kind, dtype, b.values[0], id=f"{kind}-{dtype_id(dtype)}-{b.id}", marks=b.marks)
    for kind in DEGENERATE
    for dtype in ALL_DTYPES
    for b in EVERY
    if not (b.values[0] == "torch" and dtype in (torch.float16, torch.bfloat16))
    and not (dtype == torch.float16 and kind in FP16_BELOW_FLOOR)
]


def assert_finite(t: torch.Tensor, what: str) -> None:
    assert torch.isfinite(t).all(), f"{what} is not finite: {t}"


@pytest.mark.parametrize("kind,dtype,backend", DEGENERATE_PARAMS)
def test_degenerate_inputs_finite(kind, dtype, backend):
    """Zero, duplicate, aligned, anti-aligned and tiny rows: finite losses, gradients and statistics."""
    assert_degenerate_finite(degenerate(kind, dtype).to(device_of(backend)), backend)


def assert_degenerate_finite(x, backend):
    """Every loss (forward and gradient), normalize, cosine_gram and the statistics are finite on x."""
    for case in LOSS_CASES:
        for reduction in ("none", "mean"):
            leaf = x.clone().requires_grad_()
            out = case(leaf, backend=backend, reduction=reduction)
            assert_finite(out, f"{case.id} forward")
            out.sum().backward()
            assert_finite(leaf.grad, f"{case.id} gradient")
    leaf = x.clone().requires_grad_()
    (fastdiv.normalize(leaf, backend=backend).float().sum()
     + fastdiv.cosine_gram(leaf, backend=backend).sum()).backward()
    assert_finite(leaf.grad, "normalize/cosine_gram gradient")
    for q in (1.0, 2.0, math.inf):
        stats = fastdiv.concentration_stats(x, q=q, backend=backend)
        for field in STAT_FIELDS:
            assert_finite(getattr(stats, field), f"concentration_stats.{field} (q={q})")


@pytest.mark.parametrize("kind", DEGENERATE)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", FUSED)
def test_degenerate_inputs_backends_agree(backend, case, kind):
    """fp64: the kernels give the reference's values and gradients on degenerate rows too."""
    x = degenerate(kind, torch.float64)
    w = upstream_weights(2)
    fused, ref = fused_and_reference(case, x, w, backend)
    assert_close64(fused[0], ref[0], "value", rtol=1e-8)
    if case.id == "max" and max_subgradient_ambiguous(x, kind):
        return
    assert_close64(fused[1], ref[1], "gradient", rtol=1e-7, atol=1e-7)


def max_subgradient_ambiguous(x, kind) -> bool:
    """At a tie of the max cosine the kernels and the reference pick different (valid) subgradients: the
    kernel the first pair, amax an even split. True where gradients of R_max can't be compared: a tied
    max, unless all tied pairs are aligned (there every subgradient is ~0)."""
    c = reference.cosine_gram(x)
    off = ~torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    ties = (c[:, off] >= c[:, off].amax(dim=-1, keepdim=True) - 1e-12).sum(dim=-1)
    return bool((ties > 2).any()) and kind not in ("aligned", "identical")


@pytest.mark.parametrize("backend", CPU_SIDE)
def test_all_zero_input_values(backend):
    """u = 0 everywhere: every cosine is 0, rho = 0, Var = 0; every gradient is exactly 0."""
    n, d = 4, 6
    x = torch.zeros(2, n, d, dtype=torch.float64)
    expected = {
        "dpp": -n * math.log(1e-4),
        "mean": 0.0, "kappa": 0.0, "max": 0.0,
        "smoothmax": math.log(n * (n - 1)), "gal": math.log(n * (n - 1) / 2),
        "mean_penalty": 0.0, "var-target": d * (1.0 / d) ** 2, "var-min": 0.0, "var-softmin": 0.0,
        "sparsity": 0.0,
    }
    for case in LOSS_CASES:
        v, g = value_and_grad(loss_fn(case, backend), x)
        assert_close64(v, torch.full((2,), expected[case.id], dtype=torch.float64), case.id)
        assert g.abs().max().item() == 0.0, case.id
    stats = fastdiv.concentration_stats(x, backend=backend)
    assert stats.rho.abs().max() == 0 and stats.rho_q.abs().max() == 0 and stats.kappa.abs().max() == 0


@pytest.mark.parametrize("jitter", [1e-4, 1e-2])
@pytest.mark.parametrize("n", [2, 3, 10])
@pytest.mark.parametrize("backend", CPU_SIDE)
def test_dpp_aligned_rows_documented_value(backend, n, jitter):
    """dpp_loss docstring: fully aligned rows give -(n-1) log(jitter) - log(n + jitter), finite gradient."""
    scales = torch.linspace(0.5, 3.0, n, dtype=torch.float64)[None, :, None]
    x = randn(3, 1, 8, seed=61) * scales
    v, g = value_and_grad(lambda t: fastdiv.dpp_loss(t, jitter=jitter, backend=backend, reduction="none"), x)
    expected = -(n - 1) * math.log(jitter) - math.log(n + jitter)
    assert_close64(v, torch.full((3,), expected, dtype=torch.float64), "aligned R_DPP", rtol=1e-7)
    assert_finite(g, "gradient")
    if n == 10 and jitter == 1e-4:
        assert abs(expected - 80.6) < 0.05  # the number quoted in the docstring
    # fp32 input, against an error bound (first order in the rounding; gamma_k = k u / (1 - k u)):
    # - the Gram of the rows, accumulated in fp32 over D terms in any order, has |dS_ij| <= gamma_D
    #   |x_i|.|x_j| <= gamma_D r_i r_j (Cauchy-Schwarz); with the norms' own error the cosines C_ij =
    #   S_ij / (r_i r_j) are off by at most 2 gamma_(D+4). backend='torch' also runs logdet in fp32, whose
    #   LU has backward error gamma_3n |L||U| <= 2 gamma_3n here (|L||U| <= 2 max |C + jitter I|).
    # - -log det is dL = -tr(W dC) to first order, W = (C + jitter I)^-1; for aligned rows (C = 11^T)
    #   W = (I - 11^T / (n + jitter)) / jitter, so sum |W_ij| ~ 2 (n - 1) / jitter: the bound grows like
    #   u / jitter (0.02 absolute for n = 2, D = 8, jitter 1e-4, against a value of 8.5).
    # - the fp32 result is rounded once more: u |L|.
    # Rounding the aligned rows to fp32 turns them by ~u, which moves C by ~u^2 and L by ~u^2 / jitter.
    n_, d = x.shape[1], x[0].numel() // x.shape[1]
    w_abs = torch.linalg.inv(torch.ones(n_, n_, dtype=torch.float64)
                             + jitter * torch.eye(n_, dtype=torch.float64)).abs()
    d_cos = 2 * gamma(d + 4, torch.float32) + 2 * gamma(3 * n_, torch.float32)
    bound = w_abs.sum().item() * d_cos + unit_roundoff(torch.float32) * abs(expected)
    v32 = fastdiv.dpp_loss(x.float(), jitter=jitter, backend=backend, reduction="none")
    err = (v32.double() - expected).abs().max().item()
    assert err <= bound, f"fp32 aligned R_DPP error {err:.3e} above its rounding bound {bound:.3e}"


@pytest.mark.parametrize("backend", CPU_SIDE)
def test_anti_aligned_pair_values(backend):
    u = randn(2, 1, 5, seed=62)
    x = torch.cat([u, -3 * u], dim=1)
    kw = dict(backend=backend, reduction="none")
    minus_one = torch.full((2,), -1.0, dtype=torch.float64)
    assert_close64(fastdiv.mean_cosine_loss(x, **kw), minus_one, "R_mean")
    assert_close64(fastdiv.max_cosine_loss(x, **kw), minus_one, "R_max")
    assert_close64(fastdiv.mean_penalty(x, **kw), torch.zeros(2, dtype=torch.float64), "Omega_M")
    # rho = sqrt(sum_ij C_ij) / n (docs/design.md §2.1): the sqrt of a sum that cancels to ~1e-16 leaves rho
    # (and R_kappa ~ rho near 0) at ~1e-8 in fp64, not 1e-16.
    assert_close64(fastdiv.kappa_loss(x, **kw), torch.zeros(2, dtype=torch.float64), "R_kappa", atol=1e-7)
    j = 1e-4  # det [[1 + j, -1], [-1, 1 + j]] = 2 j + j^2
    assert_close64(fastdiv.dpp_loss(x, **kw), torch.full((2,), -math.log(2 * j + j * j), dtype=torch.float64),
                   "R_DPP", rtol=1e-7)
    stats = fastdiv.concentration_stats(x, backend=backend)
    assert_close64(stats.rho, torch.zeros(2, dtype=torch.float64), "rho", atol=1e-7)
    assert_close64(stats.mean_cos, minus_one, "mean_cos")
    assert_close64(stats.coherence, minus_one, "coherence")


@pytest.mark.parametrize("backend", CPU_SIDE)
def test_kappa_clamp_aligned_rows(backend):
    """kappa_loss docstring: above rho_max the loss is the constant kappa_hat(rho_max) / p, gradient 0."""
    d = 6
    x = randn(2, 1, d, seed=63) * torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)[None, :, None]
    for rho_max, p in [(1 - 1e-6, None), (0.9, None), (0.5, 3.0)]:
        kw = {} if p is None else {"p": p}
        v, g = value_and_grad(lambda t: fastdiv.kappa_loss(t, rho_max=rho_max, backend=backend,
                                                           reduction="none", **kw), x)
        pp = float(d if p is None else p)
        expected = rho_max * (pp - rho_max) / (1 - rho_max ** 2) / pp
        assert_close64(v, torch.full((2,), expected, dtype=torch.float64), f"rho_max={rho_max}", rtol=1e-6)
        assert g.abs().max().item() == 0.0
    # below the clamp: a partially aligned input is not clamped and has a gradient
    y = randn(2, 3, d, seed=64)
    v, g = value_and_grad(lambda t: fastdiv.kappa_loss(t, rho_max=0.999, backend=backend, reduction="none"), y)
    rho = reference.mean_resultant_length(y)
    assert_close64(v, rho * (d - rho) / (1 - rho ** 2) / d, "unclamped")
    assert g.abs().max().item() > 0


def cancelling_rows(seed: int) -> torch.Tensor:
    """Inputs whose unit rows sum to ~0 (rho ~ 0): rows [u, -3u, 0.7v, -v] (scales that are not powers
    of two, so the products are rounded as in real data)."""
    u, v = randn(4, 1, 50, seed=seed), randn(4, 1, 50, seed=seed + 1)
    return torch.cat([u, -3 * u, 0.7 * v, -v], dim=1)


@pytest.mark.parametrize("target", ["kappa", "mean_penalty", "stats-rho", "stats-kappa", "stats-rho_q"])
@pytest.mark.parametrize("backend", backends("cpu"))
def test_parity_fp32_cancelling_rows(backend, target):
    """The parity rule near rho = 0, where the unit gradients cancel (a perfectly diverse set)."""
    x64 = cancelling_rows(seed=65)
    x32 = x64.float()
    dev = device_of(backend)
    if target.startswith("stats-"):
        field = target[len("stats-"):]
        get = lambda t, be: getattr(fastdiv.concentration_stats(t, backend=be), field).cpu()  # noqa: E731
        assert_parity(get(x32.to(dev), backend), get(x32, "torch"), get(x64, "torch"), torch.float32, field)
    else:
        case = LOSS_BY_ID[target]
        truth = case(x64, backend="torch", reduction="none")
        assert_parity(case(x32.to(dev), backend=backend, reduction="none").cpu(),
                      case(x32, backend="torch", reduction="none"), truth, torch.float32, target)


NONFINITE = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


@pytest.mark.parametrize("value", list(NONFINITE), ids=list(NONFINITE))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", CPU_SIDE)
def test_nonfinite_input_gives_nan_for_that_input(backend, dtype, value):
    x = randn(3, 4, 5, seed=71).to(dtype)
    x[1, 2, 3] = NONFINITE[value]
    clean = torch.tensor([True, False, True])
    for case in LOSS_CASES:
        leaf = x.clone().requires_grad_()
        out = case(leaf, backend=backend, reduction="none")
        assert torch.isnan(out).tolist() == [False, True, False], f"{case.id}: {out}"
        out.sum().backward()  # no crash
        assert_finite(leaf.grad[clean], f"{case.id} gradient of the clean inputs")
        for reduction in ("mean", "sum"):
            assert torch.isnan(case(x, backend=backend, reduction=reduction)), case.id
    for q in (1.0, 2.0, math.inf):
        stats = fastdiv.concentration_stats(x, q=q, backend=backend)
        for field in STAT_FIELDS:
            assert torch.isnan(getattr(stats, field)).tolist() == [False, True, False], f"{field} (q={q})"
    u = fastdiv.normalize(x, backend=backend)
    assert torch.isnan(u.flatten(2)).any(-1).tolist() == [[False] * 4, [False, False, True, False], [False] * 4]
    c = fastdiv.cosine_gram(x, backend=backend)
    assert torch.isnan(c.flatten(1)).any(-1).tolist() == [False, True, False]
    assert torch.isfinite(c[clean]).all()


@pytest.mark.parametrize("backend", CPU_SIDE)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_nonfinite_input_backend_agreement(case, backend):
    """The clean inputs of a batch with a NaN input keep their exact values and gradients."""
    x = randn(3, 4, 5, seed=72)
    y = x.clone()
    y[1, 0, 0] = math.nan
    w = upstream_weights(3)
    v, g = value_and_grad(loss_fn(case, backend), x, w)
    vn, gn = value_and_grad(loss_fn(case, backend), y, w)
    keep = torch.tensor([True, False, True])
    assert_close64(vn[keep], v[keep], "values")
    assert_close64(gn[keep], g[keep], "gradients")


@pytest.mark.parametrize("sample_dim", [1, 0])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", CPU_SIDE)
def test_inputs_never_modified(backend, dtype, sample_dim):
    base = randn(5, 3, 2, 7, seed=81).to(dtype)
    base[1, 0] = 0  # a zero row
    for x in (base, base[:, ::2, :, ::3]):  # contiguous and strided
        before = x.clone()
        leaf = x.clone().requires_grad_()
        leaf_before = leaf.detach().clone()
        total = 0
        for case in LOSS_CASES:
            total = total + case(leaf, backend=backend, sample_dim=sample_dim)
        total = total + fastdiv.normalize(leaf, backend=backend, sample_dim=sample_dim).float().sum()
        total = total + fastdiv.cosine_gram(leaf, backend=backend, sample_dim=sample_dim).sum()
        total.backward()
        fastdiv.concentration_stats(x, backend=backend, sample_dim=sample_dim)
        fastdiv.concentration_stats(x, q=math.inf, backend=backend, sample_dim=sample_dim)
        assert torch.equal(x, before)
        assert torch.equal(leaf.detach(), leaf_before)


# Documented guarantee (losses.py module docstring, docs/design.md §3): "an all-zero gradient maps to the
# zero vector and never produces NaN". Half precision has its own tests because fp16's range (6.1e-5 ..
# 65504) cannot hold eps = 1e-12 nor the 1/eps-sized derivative of a row below the norm floor.
@pytest.mark.parametrize("backend", CPU_SIDE)
def test_zero_rows_fp16_forward_finite(backend):
    bad = []
    for case in LOSS_CASES:
        for kind in ("zero-row", "all-zero"):
            if not torch.isfinite(case(degenerate(kind, torch.float16), backend=backend, reduction="none")).all():
                bad.append(f"{case.id}/{kind}")
    u = fastdiv.normalize(degenerate("zero-row", torch.float16), backend=backend)
    if not torch.isfinite(u).all():
        bad.append("normalize/zero-row")
    assert not bad, f"backend={backend!r}: NaN/Inf forward on fp16 inputs with zero rows: {bad}"


@pytest.mark.parametrize("backend", backends("cpu"))
def test_zero_rows_fp16_backward_finite(backend):
    bad = []
    for case in LOSS_CASES:
        x = degenerate("zero-row", torch.float16).to(device_of(backend)).requires_grad_()
        case(x, backend=backend).backward()
        if not torch.isfinite(x.grad).all():
            bad.append(f"{case.id} (max |grad| of the zero row: {x.grad[:, 1].abs().max().item()})")
    assert not bad, f"backend={backend!r}: NaN/Inf gradient on fp16 inputs with a zero row: {bad}"


@pytest.mark.parametrize("eps", [1e-12, 1e-20], ids=lambda e: f"eps{e:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("backend", CPU_SIDE)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_zero_rows_small_eps_finite(case, backend, dtype, eps):
    """Any positive finite eps is accepted; zero rows must stay finite in forward and backward."""
    x = degenerate("zero-row", dtype).requires_grad_()
    out = case(x, backend=backend, eps=eps, reduction="none")
    assert_finite(out, "forward")
    out.sum().backward()
    assert_finite(x.grad, f"{case.id} gradient ({backend}, {dtype}, eps={eps})")


# =====================================================================================================
# 6. argument errors
# =====================================================================================================

X = randn(2, 3, 4, seed=91).float()
LOSS_FNS = {c.id: c for c in LOSS_CASES}
ALL_FNS = {**LOSS_FNS, "normalize": fastdiv.normalize, "cosine_gram": fastdiv.cosine_gram,
           "concentration_stats": fastdiv.concentration_stats}


@pytest.mark.parametrize("name", list(ALL_FNS))
def test_error_wrong_rank(name):
    fn = ALL_FNS[name]
    for bad in (torch.randn(3, 4), torch.randn(4)):
        with pytest.raises(ValueError, match="grads"):
            fn(bad)
        with pytest.raises(ValueError, match="grads"):
            fn(bad, sample_dim=0)


@pytest.mark.parametrize("backend", CPU_SIDE)
@pytest.mark.parametrize("name", list(ALL_FNS))
def test_error_dtype(name, backend):
    fn = ALL_FNS[name]
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.complex128):
        with pytest.raises(TypeError, match=r"grads.*dtype"):
            fn(torch.ones(2, 3, 4, dtype=dtype), backend=backend)
    with pytest.raises(TypeError, match="grads"):
        fn([[[1.0, 2.0]]], backend=backend)


@pytest.mark.parametrize("name", list(LOSS_FNS) + ["concentration_stats"])
def test_error_too_few_samples(name):
    fn = ALL_FNS[name]
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="at least 2 gradient samples"):
            fn(torch.randn(3, 1, 4), backend=backend)
        with pytest.raises(ValueError, match="at least 2 gradient samples"):
            fn(torch.randn(1, 3, 4), sample_dim=0, backend=backend)


@pytest.mark.parametrize("name", ["normalize", "cosine_gram"])
def test_single_sample_allowed_for_normalize_and_cosine_gram(name):
    x = randn(3, 1, 4, seed=92)
    out = ALL_FNS[name](x, backend="cpu")
    assert_close64(out, ALL_FNS[name](x, backend="torch"), name)


@pytest.mark.parametrize("name", list(ALL_FNS))
def test_error_no_features_and_bad_sample_dim(name):
    fn = ALL_FNS[name]
    with pytest.raises(ValueError, match="features"):
        fn(torch.randn(2, 3, 0))
    for sd in (2, -1, None):
        with pytest.raises(ValueError, match="sample_dim"):
            fn(X, sample_dim=sd)


@pytest.mark.parametrize("name", list(LOSS_FNS))
def test_error_reduction(name):
    for bad in ("avg", "MEAN", None, ""):
        with pytest.raises(ValueError, match="reduction"):
            LOSS_FNS[name](X, reduction=bad)


@pytest.mark.parametrize("name", list(ALL_FNS))
def test_error_backend(name, monkeypatch):
    fn = ALL_FNS[name]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # without the interpreter Triton needs CUDA
    with pytest.raises(ValueError, match="backend"):
        fn(X, backend="gpu")
    with pytest.raises(ValueError, match="backend='cuda'"):  # a CPU tensor cannot run on the CUDA backend
        fn(X, backend="cuda")
    with pytest.raises((ValueError, RuntimeError), match="backend='triton'"):
        fn(X, backend="triton")


@pytest.mark.parametrize("name", list(ALL_FNS))
def test_error_eps(name):
    for bad in (0, 0.0, -1e-12, math.inf, math.nan, "1e-12", True):
        with pytest.raises(ValueError, match="eps"):
            ALL_FNS[name](X, eps=bad)


def test_error_hyperparameters():
    for bad in (0, -1e-4, math.inf, math.nan, None):
        with pytest.raises(ValueError, match="jitter"):
            fastdiv.dpp_loss(X, jitter=bad)
        with pytest.raises(ValueError, match="jitter"):
            fastdiv.concentration_stats(X, jitter=bad)
    for bad in (0, -3.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match=r"\bp\b"):
            fastdiv.kappa_loss(X, p=bad)
    for bad in (0.0, 1.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="rho_max"):
            fastdiv.kappa_loss(X, rho_max=bad)
        with pytest.raises(ValueError, match="rho_max"):
            fastdiv.concentration_stats(X, rho_max=bad)
    for bad in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            fastdiv.variance_penalty(X, kind="softmin", temperature=bad)
    for bad in (0.0, 0.999, -1.0, math.nan, "2", None, True):
        with pytest.raises((ValueError, TypeError), match=r"\bq\b"):
            fastdiv.concentration_stats(X, q=bad)


def test_error_variance_kind_and_diversity_name():
    for bad in ("max", "Target", "", None):
        with pytest.raises(ValueError, match="kind"):
            fastdiv.variance_penalty(X, kind=bad)
        with pytest.raises(ValueError, match="kind"):
            fastdiv.diversity_loss("d3-var", X, kind=bad)
    for bad in ("foo", "DPP", "d3", "kappa_loss"):
        with pytest.raises(ValueError, match="name"):
            fastdiv.diversity_loss(bad, X)
    with pytest.raises(TypeError):  # a keyword the chosen loss does not take
        fastdiv.diversity_loss("mean", X, jitter=1e-3)


def test_error_mentions_function_and_shape():
    with pytest.raises(ValueError) as info:
        fastdiv.gal_loss(torch.randn(3, 1, 4))
    assert "gal_loss" in str(info.value) and "(3, 1, 4)" in str(info.value)
    with pytest.raises(ValueError) as info:
        fastdiv.mean_penalty(torch.randn(5, 6))
    assert "mean_penalty" in str(info.value) and "(5, 6)" in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_error_cpu_backend_on_cuda_tensor():
    x = torch.randn(2, 3, 4, device="cuda")
    with pytest.raises(ValueError, match="backend='cpu'"):
        fastdiv.dpp_loss(x, backend="cpu")


# =====================================================================================================
# dtypes, reductions, dispatch, hyperparameters, concentration_stats
# =====================================================================================================


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", CPU_SIDE)
def test_output_dtypes(backend, dtype):
    x = randn(3, 4, 5, seed=101).to(dtype).requires_grad_()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for case in LOSS_CASES:
        for reduction in ("none", "mean", "sum"):
            out = case(x, backend=backend, reduction=reduction)
            assert out.dtype == acc, (case.id, reduction)
            assert out.shape == ((3,) if reduction == "none" else ())
            assert out.requires_grad
        (grad,) = torch.autograd.grad(case(x, backend=backend), x)
        assert grad.dtype == dtype and grad.shape == x.shape
    u = fastdiv.normalize(x, backend=backend)
    assert u.dtype == dtype and u.shape == x.shape
    assert fastdiv.cosine_gram(x, backend=backend).dtype == acc
    stats = fastdiv.concentration_stats(x, backend=backend)
    for field in STAT_FIELDS:
        t = getattr(stats, field)
        assert t.dtype == acc and t.shape == (3,) and not t.requires_grad, field


@pytest.mark.parametrize("backend", CPU_SIDE)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_reductions(case, backend):
    x = randn(5, 4, 6, seed=102)
    none = case(x, backend=backend, reduction="none")
    assert_close64(case(x, backend=backend, reduction="sum"), none.sum(), "sum")
    assert_close64(case(x, backend=backend, reduction="mean"), none.mean(), "mean")
    assert_close64(case(x, backend=backend), none.mean(), "default reduction is mean")
    # per-input independence: each entry only depends on its own input
    assert_close64(none[2:3], case(x[2:3], backend=backend, reduction="none"), "per input")


@pytest.mark.parametrize("backend", CPU_SIDE)
def test_diversity_loss_dispatch(backend):
    assert set(fastdiv.DIVERSITY_LOSSES) == {"dpp", "mean", "kappa", "max", "smoothmax", "gal", "d3-mean",
                                              "d3-var", "d3-sparse"}
    expected_fns = {"dpp": fastdiv.dpp_loss, "mean": fastdiv.mean_cosine_loss, "kappa": fastdiv.kappa_loss,
                    "max": fastdiv.max_cosine_loss, "smoothmax": fastdiv.smoothmax_cosine_loss,
                    "gal": fastdiv.gal_loss, "d3-mean": fastdiv.mean_penalty, "d3-var": fastdiv.variance_penalty,
                    "d3-sparse": fastdiv.sparsity_penalty}
    assert fastdiv.DIVERSITY_LOSSES == expected_fns
    x = randn(3, 4, 5, seed=103)
    for name, fn in expected_fns.items():
        assert torch.equal(fastdiv.diversity_loss(name, x, backend=backend, reduction="none"),
                           fn(x, backend=backend, reduction="none")), name
    # keyword arguments reach the chosen loss
    assert torch.equal(fastdiv.diversity_loss("dpp", x, jitter=1e-2, backend=backend),
                       fastdiv.dpp_loss(x, jitter=1e-2, backend=backend))
    assert torch.equal(fastdiv.diversity_loss("d3-var", x, kind="softmin", temperature=0.2, backend=backend),
                       fastdiv.variance_penalty(x, kind="softmin", temperature=0.2, backend=backend))
    assert not torch.equal(fastdiv.diversity_loss("d3-var", x, kind="min", backend=backend),
                           fastdiv.diversity_loss("d3-var", x, backend=backend))


HYPER = [
    ("dpp", dict(jitter=1e-2)), ("dpp", dict(jitter=1e-7)), ("dpp", dict(jitter=3)),
    ("kappa", dict(p=3.5)), ("kappa", dict(p=1)), ("kappa", dict(rho_max=0.3)),
    ("var-softmin", dict(temperature=0.5)), ("var-softmin", dict(temperature=1e-4)),
    ("mean", dict(eps=0.5)), ("sparsity", dict(eps=0.5)), ("var-target", dict(eps=0.5)),
]


@pytest.mark.parametrize("case_id,kw", HYPER, ids=[f"{c}-{kw}" for c, kw in HYPER])
@pytest.mark.parametrize("backend", FUSED)
def test_hyperparameters_parity(backend, case_id, kw):
    case = LOSS_BY_ID[case_id]
    x = randn(4, 5, 6, seed=104)
    x[:, 1] *= 0.1  # below eps=0.5 for the eps cases
    check_fp64_and_fp32(case, x, backend, **kw)
    # the parameter is actually used
    x = x.to(device_of(backend))
    default = case(x, backend=backend, reduction="none")
    assert not torch.allclose(case(x, backend=backend, reduction="none", **kw), default), "parameter had no effect"


@pytest.mark.parametrize("backend", CPU_SIDE)
def test_variance_temperature_default_is_one_over_d(backend):
    x = randn(3, 4, 9, seed=105)
    a = fastdiv.variance_penalty(x, kind="softmin", backend=backend, reduction="none")
    b = fastdiv.variance_penalty(x, kind="softmin", temperature=1 / 9, backend=backend, reduction="none")
    assert_close64(a, b, "temperature default")


@pytest.mark.parametrize("backend", CPU_SIDE)
def test_kappa_p_default_is_feature_dim(backend):
    x = randn(3, 4, 2, 5, seed=106)
    assert_close64(fastdiv.kappa_loss(x, backend=backend), fastdiv.kappa_loss(x, p=10, backend=backend), "p = D")


def test_auto_backend_is_cpu_kernels():
    x = randn(3, 4, 5, seed=107).float()
    for case in LOSS_CASES:
        assert torch.equal(case(x, reduction="none"), case(x, backend="cpu", reduction="none")), case.id
    assert torch.equal(fastdiv.normalize(x), fastdiv.normalize(x, backend="cpu"))


@pytest.mark.parametrize("q", [1.0, 1.5, 2.0, 3.0, 7.0, math.inf, 1, 2], ids=lambda q: f"q={q!r}")
@pytest.mark.parametrize("backend", CPU_SIDE)
def test_concentration_stats_q(backend, q):
    x = randn(4, 5, 11, seed=108)
    stats = fastdiv.concentration_stats(x, q=q, backend=backend)
    mean = reference.unit_rows(x).mean(dim=1)
    if math.isinf(q):
        expected = mean.abs().amax(dim=-1)
    else:
        expected = mean.abs().pow(q).sum(dim=-1).pow(1 / q)
    assert_close64(stats.rho_q, expected, "rho_q")
    if q == 2:
        assert_close64(stats.rho_q, stats.rho, "rho_q == rho for q = 2")
    # norm ordering: ||m||_inf <= ||m||_q <= ||m||_1
    assert (stats.rho_q <= fastdiv.concentration_stats(x, q=1.0, backend=backend).rho_q + 1e-12).all()
    assert (stats.rho_q >= fastdiv.concentration_stats(x, q=math.inf, backend=backend).rho_q - 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_concentration_stats_backends_agree(dtype):
    x = randn(6, 7, 300, seed=109).to(dtype)
    for q in (1.0, 2.0, math.inf):
        for kw in ({}, dict(jitter=1e-2, rho_max=0.5, eps=1e-3)):
            fused = fastdiv.concentration_stats(x, q=q, backend="cpu", **kw)
            ref = fastdiv.concentration_stats(x, q=q, backend="torch", **kw)
            assert isinstance(fused, fastdiv.ConcentrationStats)
            for field in STAT_FIELDS:
                if dtype == torch.float64:
                    assert_close64(getattr(fused, field), getattr(ref, field), field)
                else:
                    torch.testing.assert_close(getattr(fused, field), getattr(ref, field), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_SIDE)
def test_concentration_stats_no_autograd(backend):
    x = randn(2, 3, 4, seed=110).requires_grad_()
    stats = fastdiv.concentration_stats(x, backend=backend)
    assert all(not getattr(stats, f).requires_grad and getattr(stats, f).grad_fn is None for f in STAT_FIELDS)


# =====================================================================================================
# the GPU-sized matrix: every loss against the float64 reference (dtypes, n, D, grid shapes)
# =====================================================================================================


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_losses_every_dtype(backend, case, dtype):
    """The CIFAR-10 size: n = 10 gradients of D = 3072."""
    check_loss(case, backend, randn(3, 10, 3072, seed=1), [dtype])


#: 33 and 40 are past the single-launch tile of the CUDA kernels (n <= 32): the two-launch fallback
N_VALUES = [2, 3, 10, 17, 32, 33, 40]


@pytest.mark.parametrize("n", N_VALUES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_losses_number_of_samples(backend, case, n):
    check_loss(case, backend, randn(3, n, 3072, seed=n), [torch.float64, torch.float32, torch.bfloat16])


@pytest.mark.parametrize("d", [1, 7, 3072], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_losses_feature_dim(backend, case, d):
    x64 = randn(5, 3, d, seed=d)
    if case.id == "dpp" and d == 1:
        check_dpp_rank_one(backend, x64)
        return
    check_loss(case, backend, x64, [torch.float64, torch.float32, torch.float16])


@pytest.mark.parametrize("shape", [(300, 10, 200), (2, 3, 100_003)], ids=["B300", "D100003"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_losses_grid_shapes(backend, case, shape):
    """More inputs than a GPU has multiprocessors, and rows long enough to be split across blocks."""
    check_loss(case, backend, randn(*shape, seed=2), [torch.float64, torch.float32])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_normalize_cosine_gram_stats(backend, dtype):
    x64 = randn(4, 10, 3, 32, 32, seed=7)  # multi-dim features, D = 3072
    xl = x64.to(dtype)
    device = device_of(backend)
    for name, fn in (("normalize", fastdiv.normalize), ("cosine_gram", fastdiv.cosine_gram)):
        out_shape = fn(x64[:1], backend="torch").shape[1:]
        gen = torch.Generator().manual_seed(3)
        w = torch.rand((4,) + tuple(out_shape), generator=gen, dtype=torch.float64) + 0.5
        truth = value_and_grad(lambda t: fn(t, backend="torch"), x64, w)
        got = value_and_grad(on_device(lambda t: fn(t, backend=backend), backend), xl, w)
        if dtype == torch.float64:
            assert_close64(got[0], truth[0], f"{name} value")
            assert_close64(got[1], truth[1], f"{name} gradient", rtol=1e-8)
        else:
            ref = value_and_grad(lambda t: fn(t, backend="torch"), xl, w)
            assert_parity(got[0], ref[0], truth[0], dtype, f"{name} value")
            assert_parity(got[1], ref[1], truth[1], dtype, f"{name} gradient")
    for q in (1.0, 2.0, 3.0, math.inf):
        truth = fastdiv.concentration_stats(x64, q=q, backend="torch")
        got = fastdiv.concentration_stats(xl.to(device), q=q, backend=backend)
        ref = fastdiv.concentration_stats(xl, q=q, backend="torch")
        for field in STAT_FIELDS:
            g = getattr(got, field)
            assert g.device.type == torch.device(device).type and g.dtype == acc_of(dtype) and not g.requires_grad
            if dtype == torch.float64:
                assert_close64(g.cpu(), getattr(truth, field), f"{field} (q={q})")
            else:
                assert_parity(g.cpu(), getattr(ref, field), getattr(truth, field), dtype, f"{field} (q={q})")


# =====================================================================================================
# the public API of a fused backend against the C++ CPU kernels on the same data
# =====================================================================================================


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_public_api_matches_cpu_backend(backend, dtype):
    x = randn(8, 10, 3, 32, 32, seed=5).to(dtype)
    w = upstream_weights(8)
    for case in LOSS_CASES:
        got = value_and_grad(on_device(loss_fn(case, backend), backend), x, w)
        want = value_and_grad(loss_fn(case, CPU_BACKEND), x, w)
        close(got[0], want[0], ACC_TOL[acc_of(dtype)], f"{case.id} value")
        # the gradient is stored in x's dtype (the double() of value_and_grad is exact)
        close(got[1], want[1], OUT_TOL[dtype], f"{case.id} gradient")
    xd = x.to(device_of(backend))
    for q in (1.0, 2.0, math.inf):
        got = fastdiv.concentration_stats(xd, q=q, backend=backend)
        want = fastdiv.concentration_stats(x, q=q, backend=CPU_BACKEND)
        for field in STAT_FIELDS:
            close(getattr(got, field), getattr(want, field), ACC_TOL[acc_of(dtype)], f"{field} (q={q})")
    close(fastdiv.normalize(xd, backend=backend), fastdiv.normalize(x, backend=CPU_BACKEND), OUT_TOL[dtype],
          "normalize")
    close(fastdiv.cosine_gram(xd, backend=backend), fastdiv.cosine_gram(x, backend=CPU_BACKEND), ACC_TOL[acc_of(dtype)],
          "cosine_gram")


PUBLIC_LOSSES = ["dpp_loss", "mean_cosine_loss", "kappa_loss", "max_cosine_loss", "smoothmax_cosine_loss",
                 "gal_loss", "mean_penalty", "sparsity_penalty", "variance_penalty"]


def _x64(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@requires_extension
@pytest.mark.parametrize("name", PUBLIC_LOSSES)
@pytest.mark.parametrize("backend", backends("triton:cpu"))
def test_public_loss_matches_cpu_backend(backend, name):
    """Values of every public loss against backend='cpu' (multi-dim features, sample_dim 1 and 0), and a
    float64 gradcheck through the backend's pullbacks."""
    fn = getattr(fastdiv, name)
    dev = device_of(backend)
    x = _x64(3, 4, 2, 5, seed=7)  # multi-dim features
    for sample_dim, grads in ((1, x), (0, x.transpose(0, 1))):
        got = fn(grads.to(dev), reduction="none", sample_dim=sample_dim, backend=backend)
        want = fn(grads, reduction="none", sample_dim=sample_dim, backend="cpu")
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-12)
    leaf = x.clone().to(dev).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fn(t, reduction="none", backend=backend), (leaf,))


@requires_extension
@pytest.mark.parametrize("backend", backends("triton:cpu"))
def test_public_rows_and_stats_match_cpu_backend(backend):
    dev = device_of(backend)
    x = _x64(2, 5, 13, seed=8)
    leaf = x.clone().to(dev).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fastdiv.normalize(t, backend=backend), (leaf,))
    assert torch.autograd.gradcheck(lambda t: fastdiv.cosine_gram(t, backend=backend), (leaf,))
    got = fastdiv.concentration_stats(x.to(dev), backend=backend)
    want = fastdiv.concentration_stats(x, backend="cpu")
    for field in got._fields:
        torch.testing.assert_close(getattr(got, field).cpu(), getattr(want, field), rtol=1e-10, atol=1e-12)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("name", PUBLIC_LOSSES)
@pytest.mark.parametrize("backend", backends("triton:gpu"))
def test_gpu_losses_match_cpu(backend, name, dtype):
    fn = getattr(fastdiv, name)
    x = _x64(64, 10, 3, 32, 32, seed=9).to(dtype)
    leaf_gpu = x.to(device_of(backend)).requires_grad_()
    got = fn(leaf_gpu, reduction="none", backend=backend)
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


@requires_extension
@pytest.mark.parametrize("backend", backends("triton:gpu"))
def test_gpu_stats_and_rows_match_cpu(backend):
    x = _x64(32, 7, 1000, seed=10).float()
    xd = x.to(device_of(backend))
    got = fastdiv.concentration_stats(xd, backend=backend)
    want = fastdiv.concentration_stats(x, backend="cpu")
    for field in got._fields:
        torch.testing.assert_close(getattr(got, field).cpu(), getattr(want, field), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fastdiv.normalize(xd, backend=backend).cpu(),
                               fastdiv.normalize(x, backend="cpu"), rtol=1e-5, atol=1e-6)


# =====================================================================================================
# GPU layouts: strided B and n, misaligned rows, sample_dim=0 (the no-copy check: test_gpu_only.py)
# =====================================================================================================

_B, _N, _F1, _F2 = 3, 5, 4, 6
#: LAYOUTS plus two that only matter on a GPU: rows that start off a 16-byte boundary (vectorized loads)
#: and an odd stride between the n rows
GPU_LAYOUTS = {
    **LAYOUTS,
    "misaligned-rows": ((_B, _N, _F1 * _F2 + 1), lambda t: t[..., 1:].unflatten(2, (_F1, _F2)), 1),
    "odd-n-stride-sample_dim0": ((_N, _B, _F1 * _F2 + 3), lambda t: t[..., :_F1 * _F2].unflatten(2, (_F1, _F2)), 0),
}
#: the layouts fastdiv promises to read in place (features already of unit stride); the other two of
#: LAYOUTS ('permuted-features', 'strided-features') make the one documented copy
NO_COPY_LAYOUTS = [name for name in GPU_LAYOUTS if name not in ("permuted-features", "strided-features")]


def gpu_layout(name: str):
    shape, make_view, sample_dim = GPU_LAYOUTS[name]
    base = randn(*shape, seed=21)
    view = make_view(base)
    assert view.shape == ((_N, _B, _F1, _F2) if sample_dim == 0 else (_B, _N, _F1, _F2)), name
    return base, make_view, sample_dim


@pytest.mark.parametrize("name", list(GPU_LAYOUTS))
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_layouts(backend, case, name):
    """Values and gradients (w.r.t. the base tensor of the view) equal the reference's on a contiguous
    [B, n, ...] copy (fp64), and the fp32 results equal the same backend's on that copy."""
    base, make_view, sample_dim = gpu_layout(name)
    w = upstream_weights(_B)
    fused = lambda t: case(make_view(t), backend=backend, reduction="none", sample_dim=sample_dim)  # noqa: E731
    v, grad = value_and_grad(on_device(fused, backend), base, w)
    v_ref, grad_ref = value_and_grad(
        lambda t: case(as_batch_first(make_view(t), sample_dim), backend="torch", reduction="none"), base, w)
    assert_close64(v, v_ref, "value")
    assert_close64(grad, grad_ref, "gradient", rtol=1e-8)
    b32 = base.float().to(device_of(backend))
    v32 = fused(b32)
    v32_copy = case(as_batch_first(make_view(b32), sample_dim), backend=backend, reduction="none")
    close(v32, v32_copy, (1e-6, 1e-7), "fp32 value vs a contiguous copy")


@pytest.mark.parametrize("name", list(GPU_LAYOUTS))
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_gpu_layouts_normalize_cosine_gram_stats(backend, name):
    base, make_view, sample_dim = gpu_layout(name)
    view = make_view(base.to(device_of(backend)))
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
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_misaligned_rows_every_dtype(backend, case, dtype):
    """D = 3072 rows starting one element past an aligned address, with an odd row stride (3073), in
    every dtype: parity with the reference, and close to the same backend on an aligned copy."""
    x64 = randn(3, 10, 3073, seed=33)
    view = lambda t: t[..., 1:]  # noqa: E731
    w = upstream_weights(3)
    truth = value_and_grad(lambda t: case(view(t), backend="torch", reduction="none"), x64, w)
    xl = x64.to(dtype)
    got = value_and_grad(on_device(lambda t: case(view(t), backend=backend, reduction="none"), backend), xl, w)
    if dtype == torch.float64:
        assert_close64(got[0], truth[0], "value")
        assert_close64(got[1], truth[1], "gradient", rtol=1e-8)
    else:
        ref = value_and_grad(lambda t: case(view(t), backend="torch", reduction="none"), xl, w)
        assert_parity(got[0], ref[0], truth[0], dtype, "value")
        assert_parity(got[1], ref[1], truth[1], dtype, "gradient")
    aligned = value_and_grad(on_device(lambda t: case(t, backend=backend, reduction="none"), backend),
                             view(xl).contiguous(), w)
    close(got[0], aligned[0], ACC_TOL[acc_of(dtype)], "value vs an aligned copy")


# =====================================================================================================
# GPU: zero rows in fp16, non-finite inputs as on CPU
# =====================================================================================================


@pytest.mark.parametrize("backend", GPU_SIDE)
def test_zero_rows_fp16_finite(backend):
    bad = []
    for case in LOSS_CASES:
        for kind in ("zero-row", "all-zero"):
            leaf = degenerate(kind, torch.float16).to(device_of(backend)).requires_grad_()
            out = case(leaf, backend=backend, reduction="none")
            if not torch.isfinite(out).all():
                bad.append(f"{case.id}/{kind} forward")
            out.sum().backward()
            if not torch.isfinite(leaf.grad).all():
                bad.append(f"{case.id}/{kind} gradient")
    assert not bad, f"backend={backend!r}: NaN/Inf on fp16 inputs with zero rows: {bad}"


@pytest.mark.parametrize("value", list(NONFINITE))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_nonfinite_input_as_on_cpu(backend, dtype, value):
    """A NaN or Inf entry makes that input's results NaN, never raises, and leaves the other inputs'
    values and gradients alone, with the CPU kernels' values."""
    x = randn(3, 4, 5, seed=71).to(dtype)
    x[1, 2, 3] = NONFINITE[value]
    xd = x.to(device_of(backend))
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
# determinism: same input, same bits (the CPU kernels: the thread-count test below)
# =====================================================================================================

DETERMINISM_SHAPES = {"B128-n10-D3072": (128, 10, 3072), "B128-n40-D3072": (128, 40, 3072),
                      "B2-n10-D200000": (2, 10, 200_000)}


@pytest.mark.parametrize("shape", list(DETERMINISM_SHAPES))
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_deterministic(backend, case, shape):
    for dtype in (torch.float32, torch.bfloat16):
        x = gpu_randn(*DETERMINISM_SHAPES[shape], seed=3, dtype=dtype)
        w = torch.rand(x.shape[0], device=x.device) + 0.5

        def run():
            leaf = x.clone().requires_grad_()
            out = case(leaf, backend=backend, reduction="none")
            (grad,) = torch.autograd.grad(out, leaf, w)
            return out, grad

        (v1, g1), (v2, g2) = run(), run()
        assert torch.equal(v1, v2), f"{dtype_id(dtype)}: two runs gave different values"
        assert torch.equal(g1, g2), f"{dtype_id(dtype)}: two runs gave different gradients"


@pytest.mark.parametrize("backend", GPU_SIDE)
def test_deterministic_normalize_cosine_gram_stats(backend):
    for shape in DETERMINISM_SHAPES.values():
        x = gpu_randn(*shape, seed=4)
        for fn in (fastdiv.normalize, fastdiv.cosine_gram):
            assert torch.equal(fn(x, backend=backend), fn(x, backend=backend)), fn.__name__
        for q in (1.0, math.inf):
            a = fastdiv.concentration_stats(x, q=q, backend=backend)
            b = fastdiv.concentration_stats(x, q=q, backend=backend)
            assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in STAT_FIELDS), f"stats q={q}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", backends("cpu"))
def test_results_do_not_depend_on_the_thread_count(backend, dtype):
    """The CPU kernels split the batch (or the rows) over threads, never a reduction, so 1, 2 and 3
    threads give the same bits. B = 13 with n = 4, D = 2049 is above the split grain (batch_grain in
    fastdiv/csrc/cpu/kernels.h), so 2 and 3 threads really split it, unevenly for 3. Some inputs have rows
    out of the range of their squares (2^100, 2^-100, 2^63; head_math.h, "Row scaling"), whose rare path
    runs in whichever task holds them."""
    x = randn(13, 4, 2049, seed=5).to(dtype)
    x0 = randn(13, 2049, seed=6).to(dtype)
    xs = x.clone()  # the losses' input; eot_step keeps x
    xs[3] *= 2.0**100
    xs[7, 2] *= 2.0**-100
    xs[10, :2] *= 2.0**63

    def everything():
        out = []
        for case in LOSS_CASES:
            leaf = xs.clone().requires_grad_()
            value = case(leaf, backend=backend, reduction="none")
            (value * torch.arange(1, 14, dtype=value.dtype)).sum().backward()
            out += [value.detach(), leaf.grad]
        out += list(fastdiv.concentration_stats(xs, backend=backend))
        out.append(fastdiv.normalize(xs, backend=backend))
        for norm in ("linf", "l2"):
            out += list(fastdiv.eot_step(x0, x0, x.transpose(0, 1), alpha=0.01, eps=0.03, norm=norm,
                                         backend=backend))
        return out

    threads = torch.get_num_threads()
    try:
        results = {}
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results[t] = everything()
    finally:
        torch.set_num_threads(threads)
    for t in (2, 3):
        for i, (a, b) in enumerate(zip(results[1], results[t])):
            assert torch.equal(a, b), f"result {i} differs between 1 and {t} threads"


# =====================================================================================================
# double backward is rejected by the fused kernels
# =====================================================================================================


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("backend", backends("cpu"))
def test_double_backward_raises(backend, case):
    x = randn(2, 3, 4, seed=19).to(device_of(backend)).requires_grad_()
    (g,) = torch.autograd.grad(case(x, backend=backend), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.square().sum().backward()


@pytest.mark.parametrize("fn", [fastdiv.normalize, fastdiv.cosine_gram], ids=["normalize", "cosine_gram"])
@pytest.mark.parametrize("backend", backends("cpu"))
def test_double_backward_raises_normalize_cosine_gram(backend, fn):
    x = randn(2, 3, 4, seed=20).to(device_of(backend)).requires_grad_()
    out = fn(x, backend=backend)
    (g,) = torch.autograd.grad((out * torch.rand_like(out)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.square().sum().backward()


# =====================================================================================================
# torch.compile(fullgraph=True)
# =====================================================================================================


def several_losses(g):
    total = (fastdiv.dpp_loss(g) + fastdiv.mean_cosine_loss(g, reduction="sum") + fastdiv.kappa_loss(g, p=3.0)
             + fastdiv.max_cosine_loss(g) + fastdiv.smoothmax_cosine_loss(g) + fastdiv.gal_loss(g)
             + fastdiv.mean_penalty(g) + fastdiv.sparsity_penalty(g)
             + fastdiv.variance_penalty(g) + fastdiv.variance_penalty(g, kind="min")
             + fastdiv.variance_penalty(g, kind="softmin", temperature=0.5)
             + fastdiv.diversity_loss("dpp", g, jitter=1e-3, reduction="none").sum())
    return total + fastdiv.normalize(g).square().mean() + fastdiv.cosine_gram(g).mean()


def sample_dim0_losses(g):
    stats = fastdiv.concentration_stats(g, sample_dim=0, q=math.inf)
    return (fastdiv.dpp_loss(g, sample_dim=0, reduction="none") * 2
            + fastdiv.gal_loss(g, sample_dim=0, reduction="none")
            + stats.rho + stats.dpp)


def eager_and_compiled(fn, x, compiled):
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ea = fn(a)
    ca = compiled(b)
    ea.sum().backward()
    ca.sum().backward()
    return (ea, a.grad), (ca, b.grad)


@requires_extension
@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("fn", [several_losses, sample_dim0_losses], ids=["several_losses", "sample_dim0"])
def test_compile_fullgraph(fn, compile_backend):
    """backend='auto' (the C++ CPU kernels on CPU tensors)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    for shape in [(3, 5, 2, 7), (4, 5, 2, 7)]:  # a second batch size: recompiles (automatic dynamic)
        x = randn(*shape, seed=21).float()
        (e, ge), (c, gc) = eager_and_compiled(fn, x, compiled)
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-7)


@requires_extension
@pytest.mark.slow
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    compiled = torch.compile(several_losses, fullgraph=True)
    x = randn(3, 5, 2, 7, seed=22).float()
    (e, ge), (c, gc) = eager_and_compiled(several_losses, x, compiled)
    torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


@requires_extension
def test_compile_fullgraph_dynamic_shapes():
    """dynamic=True: the fake kernels must work with symbolic B and D."""
    torch._dynamo.reset()
    fn = lambda g: fastdiv.dpp_loss(g) + fastdiv.variance_penalty(g) + fastdiv.sparsity_penalty(g)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for shape in [(3, 4, 6), (5, 4, 9)]:
        x = randn(*shape, seed=23).float()
        (e, ge), (c, gc) = eager_and_compiled(fn, x, compiled)
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-7)


@requires_extension
def test_compile_fullgraph_float_argument_varies():
    """A hyperparameter passed as a Python float that changes between calls (a schedule)."""
    torch._dynamo.reset()
    fn = lambda g, jitter, t: fastdiv.dpp_loss(g, jitter=jitter) + fastdiv.variance_penalty(  # noqa: E731
        g, kind="softmin", temperature=t)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = randn(3, 4, 6, seed=24).float()
    for jitter, t in [(1e-4, 0.5), (1e-3, 0.25), (1e-2, 0.125)]:
        torch.testing.assert_close(compiled(x, jitter, t), fn(x, jitter, t), rtol=1e-6, atol=1e-6)


@requires_extension
def test_compile_empty_batch():
    torch._dynamo.reset()
    fn = lambda g: fastdiv.dpp_loss(g) + fastdiv.kappa_loss(g, reduction="sum") + fastdiv.variance_penalty(g)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = torch.zeros(0, 5, 2, 7, requires_grad=True)
    out = compiled(x)
    assert out.item() == 0.0
    out.backward()
    assert x.grad.shape == x.shape


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


@pytest.mark.parametrize("backend", GPU_SIDE)
def test_compile_fullgraph_every_op(backend):
    """Every public op under torch.compile(fullgraph=True) (aot_eager: the fake kernels and autograd
    registrations), two batch sizes (a recompile), against eager on the backend's device."""
    torch._dynamo.reset()
    fn = _compiled_losses(backend)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for shape in [(3, 5, 2, 7), (4, 5, 2, 7)]:
        x = randn(*shape, seed=21).float().to(device_of(backend))
        (e, ge), (c, gc) = _eager_and_compiled(fn, compiled, x)
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", GPU_SIDE)
def test_compile_fullgraph_inductor_on_gpu(backend):
    """The default compiler (Inductor, which generates Triton code around the fastdiv ops) on CUDA."""
    torch._dynamo.reset()
    fn = lambda g: (fastdiv.dpp_loss(g, backend=backend) + fastdiv.variance_penalty(g, backend=backend)  # noqa: E731
                    + fastdiv.sparsity_penalty(g, reduction="sum", backend=backend))
    compiled = torch.compile(fn, fullgraph=True)
    x = gpu_randn(16, 10, 3072, seed=22)
    (e, ge), (c, gc) = _eager_and_compiled(fn, compiled, x)
    torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


@requires_extension
@pytest.mark.parametrize("backend", backends("triton:cpu"))
def test_namespace_opcheck_and_compile(backend):
    """torch.library.opcheck of the backend's op namespace (fake kernels, autograd registration) and a
    torch.compile(fullgraph=True) of two losses on it, against backend='cpu'."""
    dev = device_of(backend)
    x = torch.randn(3, 4, 9).to(dev).requires_grad_()
    t = getattr(torch.ops, NAMESPACES[backend])
    for op, args in [(t.gram_loss.default, (x, "dpp", EPS, JITTER, 0.0, RHO_MAX)),
                     (t.gram_loss.default, (x, "sparsity", EPS, JITTER, 0.0, RHO_MAX)),
                     (t.gram.default, (x, True)), (t.normalize.default, (x, EPS)),
                     (t.column_stats.default, (x, EPS)),
                     (t.concentration_stats.default, (x.detach(), 1.0, EPS, JITTER, RHO_MAX)),
                     (t.gram_pullback.default, (x.detach(), torch.randn(3, 4, 4).to(dev), None,
                                                torch.randn(1).to(dev).expand(3)))]:
        torch.library.opcheck(op, args)
    f = torch.compile(lambda g: fastdiv.dpp_loss(g, backend=backend) + fastdiv.variance_penalty(g, backend=backend),
                      fullgraph=True, backend="aot_eager")
    value = f(x)
    (grad,) = torch.autograd.grad(value, x)
    leaf = x.detach().cpu().clone().requires_grad_()
    eager = fastdiv.dpp_loss(leaf, backend="cpu") + fastdiv.variance_penalty(leaf, backend="cpu")
    eager.backward()
    torch.testing.assert_close(value.cpu(), eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu(), leaf.grad, rtol=1e-4, atol=1e-6)
