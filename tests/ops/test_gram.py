"""The Gram-family raw ops on every backend: gram, gram_pullback, gram_loss (heads dpp, mean, kappa, max,
smoothmax, gal, mean_penalty, sparsity) and concentration_stats.

Their semantics against the reference (C++ CPU ops), torch.library.opcheck, argument errors, the backward of
the fused loss as one pullback; each backend's launchers and ops against the C++ CPU ops (values to fp64
rounding for fp64 inputs and to fp32 rounding otherwise; strided, empty, degenerate, NaN and Inf inputs);
and the fused single-launch Triton forward. The public losses built on them: test_losses.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

from fastdiv import reference

from ._helpers import (
    ACC_TOL,
    ALL_DTYPES,
    DTYPES,
    EPS,
    GPU_SIDE,
    HEADS,
    JITTER,
    LAUNCHERS,
    OP_SHAPES,
    OPCHECK,
    OUT_TOL,
    RHO_MAX,
    SEMANTICS,
    SHAPES,
    acc_of,
    acc_tol,
    check,
    check_raw_ops_match_cpu_kernels,
    check_raw_ops_strided_input_match_cpu_kernels,
    check_zero_and_duplicate_rows,
    device_of,
    kernels,
    launcher_results,
    make_x,
    namespace,
    op_inputs,
    requires_extension,
)
from conftest import STAT_FIELDS, assert_as_accurate, assert_close64, dtype_id, randn

# =====================================================================================================
# raw semantics
# =====================================================================================================


@pytest.mark.parametrize("backend", SEMANTICS)
def test_gram_op(backend):
    ops = namespace(backend)
    x = randn(3, 4, 700, seed=1)
    s, l1 = ops.gram(x, True)
    assert_close64(s, x @ x.transpose(1, 2), "S = X X^T")
    assert_close64(l1, x.abs().sum(-1), "row l1")
    s32, l1_32 = ops.gram(x.half(), False)
    assert s32.dtype == torch.float32 and l1_32.shape == (3, 0)  # fp32 accumulation for half inputs


@pytest.mark.parametrize("backend", SEMANTICS)
def test_gram_pullback_op(backend):
    ops = namespace(backend)
    x = randn(2, 3, 600, seed=2)
    a = randn(2, 3, 3, seed=3)
    beta = randn(2, 3, seed=4)
    assert_close64(ops.gram_pullback(x, a, beta), a @ x + beta[:, :, None] * torch.sign(x), "A X + beta sign(X)")
    assert_close64(ops.gram_pullback(x, a, None), a @ x, "A X")
    xh = x.half()
    out = ops.gram_pullback(xh, a.float(), None)
    assert out.dtype == torch.float16  # dX has x's dtype


@pytest.mark.parametrize("backend", SEMANTICS)
def test_gram_pullback_scale_op(backend):
    """dX_b = scale_b (A_b X_b + beta_b sign(X_b)), bit for bit the unfused a * s, beta * s call, for a
    scale of any stride: contiguous, the stride-0 expansion autograd hands out, every other element."""
    ops = namespace(backend)
    x = randn(4, 5, 300, seed=30)
    a, beta = randn(4, 5, 5, seed=31), randn(4, 5, seed=32)
    s = randn(4, seed=33)
    for scale in (s, torch.tensor(-1.5, dtype=torch.float64).expand(4), randn(8, seed=34)[::2]):
        unfused = ops.gram_pullback(x, a * scale[:, None, None], beta * scale[:, None])
        assert torch.equal(ops.gram_pullback(x, a, beta, scale), unfused), scale.stride()
        assert_close64(ops.gram_pullback(x, a, beta, scale),
                       scale[:, None, None] * (a @ x + beta[:, :, None] * torch.sign(x)), "s (A X + beta sign(X))")
        assert torch.equal(ops.gram_pullback(x, a, None, scale), ops.gram_pullback(x, a * scale[:, None, None], None))
    assert torch.equal(ops.gram_pullback(x, a, beta, None), ops.gram_pullback(x, a, beta))  # absent = 1
    # NaN / Inf / 0 scales as the unfused formula gives them, for the general and the diagonal-A fast path
    special = torch.tensor([math.nan, math.inf, 0.0, -2.0], dtype=torch.float64)
    for coef in (a, torch.diag_embed(torch.diagonal(a, dim1=1, dim2=2))):
        fused = ops.gram_pullback(x, coef, beta, special)
        unfused = ops.gram_pullback(x, coef * special[:, None, None], beta * special[:, None])
        torch.testing.assert_close(fused, unfused, rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(fused[0]).all() and torch.equal(fused[2], torch.zeros_like(fused[2]))
        assert torch.isfinite(fused[3]).all()
    xf = x.float()  # fp32 x takes an fp32 scale
    torch.testing.assert_close(ops.gram_pullback(xf, a.float(), beta.float(), s.float()),
                               ops.gram_pullback(xf, (a * s[:, None, None]).float(), (beta * s[:, None]).float()))


@pytest.mark.parametrize("backend", SEMANTICS)
def test_gram_loss_backward_is_one_pullback_launch(backend):
    """The fused loss's backward hands grad_loss to the kernel as its scale: no a * g, beta * g launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    ops = namespace(backend)
    for head in ("dpp", "sparsity"):
        x = randn(3, 4, 9, seed=35).requires_grad_()
        loss, grad_loss = ops.gram_loss(x, head, EPS, JITTER, 0.0, RHO_MAX)[0], randn(3, seed=36)
        with Record() as record:
            torch.autograd.grad(loss, x, grad_loss)
        assert record.ops == ["fastdiv.gram_pullback.default"], (head, record.ops)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backend", SEMANTICS)
def test_gram_loss_op_matches_public_loss(backend, head):
    ops = namespace(backend)
    x = randn(3, 4, 9, seed=5)
    loss, a, beta, row_scale = ops.gram_loss(x, head, EPS, JITTER, 0.0, RHO_MAX)
    assert a.shape == (3, 4, 4) and torch.allclose(a, a.transpose(1, 2))  # symmetric pullback matrix
    assert beta.shape == ((3, 4) if head == "sparsity" else (3, 0))
    assert torch.equal(row_scale, torch.ones(3, 4, dtype=x.dtype))  # no row out of range
    public = {"dpp": reference.dpp_loss, "mean": reference.mean_cosine_loss, "kappa": reference.kappa_loss,
              "max": reference.max_cosine_loss, "smoothmax": reference.smoothmax_cosine_loss,
              "gal": reference.gal_loss, "mean_penalty": reference.mean_penalty,
              "sparsity": reference.sparsity_penalty}[head]
    assert_close64(loss, public(x), head)
    # the pullback coefficients give the loss's gradient: dL/dX = A X + beta sign(X)
    leaf = x.clone().requires_grad_()
    public(leaf).sum().backward()
    assert_close64(ops.gram_pullback(x, a, beta if beta.numel() else None), leaf.grad, "pullback", rtol=1e-8)


@pytest.mark.parametrize("backend", SEMANTICS)
def test_gram_pullback_row_scale_op(backend):
    """Row i of dX_b is multiplied by row_scale[b, i]: dX = row_scale ⊙ scale (A X + beta sign(X)); absent or
    empty means 1 (bit for bit)."""
    ops = namespace(backend)
    x = randn(3, 5, 70, seed=37)
    a, beta, scale = randn(3, 5, 5, seed=38), randn(3, 5, seed=39), randn(3, seed=40)
    rs = torch.pow(2.0, randn(3, 5, seed=41).mul(30).round())
    plain = a @ x + beta[:, :, None] * torch.sign(x)
    assert_close64(ops.gram_pullback(x, a, beta, None, rs), rs[:, :, None] * plain, "row_scale (A X + beta sign X)")
    assert_close64(ops.gram_pullback(x, a, beta, scale, rs), (scale[:, None] * rs)[:, :, None] * plain, "with scale")
    assert_close64(ops.gram_pullback(x, a, None, None, rs), rs[:, :, None] * (a @ x), "no beta")
    want = ops.gram_pullback(x, a, beta, scale)
    for ones in (None, torch.ones(3, 5, dtype=torch.float64), torch.empty(3, 0, dtype=torch.float64)):
        assert torch.equal(ops.gram_pullback(x, a, beta, scale, ones), want)
    with pytest.raises(ValueError, match="row_scale"):
        ops.gram_pullback(x, a, beta, None, torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="row_scale"):
        ops.gram_pullback(x, a, beta, None, torch.ones(3, 5, dtype=torch.float32))


#: inputs whose rows' squares leave fp32's range, and a norm floor below their norms: input 0 all rows at
#: 2^100 (squares overflow), input 1 one row at 2^-100 (squares flush to 0) beside rows at 1, input 2 at 1
def _out_of_range_rows(dtype=torch.float32, seed=42):
    f = torch.ones(3, 4, 1, dtype=torch.float64)
    f[0], f[1, 2] = 2.0**100, 2.0**-100
    base = randn(3, 4, 33, seed=seed).to(dtype)
    return base, (base.double() * f).to(dtype), f


TINY_EPS = 1e-36


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backend", SEMANTICS)
def test_gram_loss_row_scales(backend, head):
    """Every row of an input with rows out of the range of their squares gets the row scale 2^-e (max |x| =
    f 2^e, f in [0.5, 1)), the rows of the other inputs 1; the loss is as accurate as on the unscaled rows
    and the pullback with the row scales is the gradient (both against fp64 on the same data:
    assert_as_accurate)."""
    ops = namespace(backend)
    base, x, f = _out_of_range_rows()
    loss, a, beta, rs = ops.gram_loss(x, head, TINY_EPS, JITTER, 0.0, RHO_MAX)
    _, e = torch.frexp(x.double().abs().amax(-1))
    scaled = (f[..., 0] != 1).any(1, keepdim=True).expand_as(rs)
    expected = torch.where(scaled, torch.pow(2.0, -e.double()), torch.ones_like(rs.double()))
    assert torch.equal(rs.double(), expected), rs
    b = beta if beta.numel() else None
    public = {"dpp": reference.dpp_loss, "mean": reference.mean_cosine_loss, "kappa": reference.kappa_loss,
              "max": reference.max_cosine_loss, "smoothmax": reference.smoothmax_cosine_loss,
              "gal": reference.gal_loss, "mean_penalty": reference.mean_penalty,
              "sparsity": reference.sparsity_penalty}[head]

    def truth(t):
        leaf = t.double().clone().requires_grad_()
        value = public(leaf, eps=TINY_EPS)
        value.sum().backward()
        return value.detach(), leaf.grad

    ref_loss, ref_a, ref_beta, ref_rs = ops.gram_loss(base, head, TINY_EPS, JITTER, 0.0, RHO_MAX)
    assert torch.equal(ref_rs, torch.ones_like(ref_rs))
    ref_grad = ops.gram_pullback(base, ref_a, ref_beta if ref_beta.numel() else None)
    (t_loss, t_grad), (t_ref_loss, t_ref_grad) = truth(x), truth(base)
    assert_as_accurate(loss, t_loss, ref_loss, t_ref_loss, torch.float32, f"{head} loss")
    grad = ops.gram_pullback(x, a, b, None, rs)
    assert_as_accurate(grad.double() * f, t_grad * f, ref_grad, t_ref_grad, torch.float32, f"{head} gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_out_of_range_rows_match_cpu_kernels(backend, dtype):
    """Rows out of the range of their squares (the fused and the n > 32 paths): every launcher of the family
    gives the C++ CPU ops' values, row scales included (float64 data at 2^+-700, outside the safe range of
    its own accumulation)."""
    ft, ops = kernels(backend), torch.ops.fastdiv
    k = 700 if dtype == torch.float64 else 100
    for n in (4, 40):
        f = torch.ones(2, n, 1, dtype=torch.float64)
        f[0], f[1, 1] = 2.0**k, 2.0**-k
        x = (randn(2, n, 4 * n + 5, seed=n) * f).to(dtype)
        xd = x.to(device_of(backend))
        tol = acc_tol(dtype)
        eps = 1e-300 if dtype == torch.float64 else TINY_EPS  # below the tiny rows' norms
        for head in HEADS:
            args = (head, eps, JITTER, 0.0, RHO_MAX)
            got, want = ft.gram_loss(xd, *args), ops.gram_loss(x, *args)
            check(got, want, tol, f"{head} n={n}")
            assert (want[3][:2] != 1).all()  # every row of an input with a row out of range
        check(ft.concentration_stats(xd, 2.0, eps, JITTER, RHO_MAX),
              ops.concentration_stats(x, 2.0, eps, JITTER, RHO_MAX), tol, f"stats n={n}")


@pytest.mark.parametrize("backend", SEMANTICS)
def test_concentration_stats_op_column_order(backend):
    ops = namespace(backend)
    x = randn(3, 5, 8, seed=6)
    out = ops.concentration_stats(x, 3.0, EPS, JITTER, RHO_MAX)
    expected = reference.concentration_stats(x, 3.0, JITTER, RHO_MAX, EPS)
    assert out.shape == (3, 6)
    for k, field in enumerate(STAT_FIELDS):
        assert_close64(out[:, k], getattr(expected, field), field)


@pytest.mark.parametrize("backend", SEMANTICS)
def test_raw_op_errors(backend):
    ops = namespace(backend)
    x = randn(2, 3, 4, seed=18).float()
    with pytest.raises(ValueError, match="head"):
        ops.gram_loss(x, "foo", EPS, JITTER, 0.0, RHO_MAX)
    with pytest.raises(ValueError, match="head"):
        ops.gram_loss(x, "DPP", EPS, JITTER, 0.0, RHO_MAX)
    with pytest.raises(ValueError, match=r"\[B, n, D\]"):
        ops.gram_loss(torch.randn(3, 4), "dpp", EPS, JITTER, 0.0, RHO_MAX)
    with pytest.raises(ValueError, match=r"\[B, n, D\]"):
        ops.gram_loss(torch.randn(1, 3, 4, 5), "dpp", EPS, JITTER, 0.0, RHO_MAX)
    with pytest.raises(ValueError, match="n >= 2"):
        ops.gram_loss(torch.randn(2, 1, 4), "dpp", EPS, JITTER, 0.0, RHO_MAX)
    with pytest.raises(ValueError, match="n >= 2"):
        ops.concentration_stats(torch.randn(2, 1, 4), 1.0, EPS, JITTER, RHO_MAX)
    with pytest.raises(ValueError, match="q"):
        ops.concentration_stats(x, 0.5, EPS, JITTER, RHO_MAX)
    with pytest.raises(TypeError, match="float32, float64"):
        ops.gram(torch.ones(2, 3, 4, dtype=torch.int32), False)
    with pytest.raises(ValueError, match="unit stride"):
        ops.gram(torch.randn(2, 3, 8)[:, :, ::2], False)
    with pytest.raises(ValueError, match=r"\[B, n, D\]"):
        ops.gram(torch.randn(3, 4), False)
    with pytest.raises(ValueError, match=r"a must be \[2, 3, 3\]"):
        ops.gram_pullback(x, torch.randn(2, 3, 4), None)
    with pytest.raises(ValueError, match="a must be"):  # fp64 coefficients for an fp32 x
        ops.gram_pullback(x, torch.randn(2, 3, 3, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="beta must be"):
        ops.gram_pullback(x, torch.randn(2, 3, 3), torch.randn(2, 4))
    for bad in (torch.randn(3), torch.randn(2, 1), torch.randn(2, dtype=torch.float64), torch.empty(0)):
        with pytest.raises(ValueError, match=r"scale must be \[2\]"):
            ops.gram_pullback(x, torch.randn(2, 3, 3), None, bad)


# =====================================================================================================
# opcheck
# =====================================================================================================


def _x(dtype, requires_grad, backend, shape=(3, 4, 5), seed=9):
    return randn(*shape, seed=seed).to(dtype).to(device_of(backend)).requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backend", OPCHECK)
def test_opcheck_gram_loss(backend, head, dtype):
    ops = namespace(backend)
    for p, rho_max in [(0.0, RHO_MAX), (2.5, 0.9)]:
        opcheck(ops.gram_loss.default, (_x(dtype, True, backend), head, EPS, JITTER, p, rho_max))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("with_l1", [True, False])
@pytest.mark.parametrize("backend", OPCHECK)
def test_opcheck_gram(backend, with_l1, dtype):
    opcheck(namespace(backend).gram.default, (_x(dtype, True, backend), with_l1))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("backend", OPCHECK)
def test_opcheck_gram_pullback(backend, dtype):
    op = namespace(backend).gram_pullback.default
    dev = device_of(backend)
    x = _x(dtype, False, backend)
    acc = dtype
    a, beta = randn(3, 4, 4, seed=10).to(acc).to(dev), randn(3, 4, seed=11).to(acc).to(dev)
    opcheck(op, (x, a, beta))
    opcheck(op, (x, a, None))
    scale = randn(3, seed=12).to(acc).to(dev)
    opcheck(op, (x, a, beta, scale))
    opcheck(op, (x, a, None, scale[:1].expand(3)))  # stride 0
    row_scale = randn(3, 4, seed=13).abs().to(acc).to(dev)
    opcheck(op, (x, a, beta, scale, row_scale))
    opcheck(op, (x, a, None, None, row_scale))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("q", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("backend", OPCHECK)
def test_opcheck_concentration_stats(backend, q, dtype):
    opcheck(namespace(backend).concentration_stats.default, (_x(dtype, False, backend), q, EPS, JITTER, RHO_MAX))


@pytest.mark.parametrize("backend", OPCHECK)
def test_opcheck_half_and_noncontiguous_inputs(backend):
    """Half inputs (fp32 outputs) and strided or transposed [B, n] dims go through the fake kernels too
    (gram_loss, concentration_stats and the row op column_stats)."""
    ops = namespace(backend)
    base = randn(4, 8, 6, seed=16).to(device_of(backend))
    for x in (base.half(), base.bfloat16(), base[::2, ::2].float(), base.transpose(0, 1).float()):
        opcheck(ops.gram_loss.default, (x.detach().requires_grad_(), "dpp", EPS, JITTER, 0.0, RHO_MAX))
        opcheck(ops.concentration_stats.default, (x, 1.0, EPS, JITTER, RHO_MAX))
        opcheck(ops.column_stats.default, (x.detach().requires_grad_(), EPS))


# =====================================================================================================
# a backend's launchers against the C++ CPU ops
# =====================================================================================================

GRAM_CASES = [(dt, n, d) for dt in ALL_DTYPES for n, d in SHAPES] + [
    (dt, 33, 1003) for dt in (torch.float64, torch.float32)]  # n > 32, the large-n case, per acc dtype


@requires_extension
@pytest.mark.parametrize("dtype,n,d", GRAM_CASES, ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else str(v))
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_gram(backend, dtype, n, d):
    ft, ops = kernels(backend), torch.ops.fastdiv
    x = make_x(2, n, d, dtype, seed=n + d)
    for with_l1 in (False, True):
        check(ft.gram(x.to(device_of(backend)), with_l1), ops.gram(x, with_l1), acc_tol(dtype), f"gram l1={with_l1}")


@requires_extension
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n,d", SHAPES + [(33, 100)], ids=str)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_gram_pullback(backend, dtype, n, d):
    ft, ops, dev = kernels(backend), torch.ops.fastdiv, device_of(backend)
    x = make_x(2, n, d, dtype, seed=n)
    acc = acc_of(dtype)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, n, n, generator=gen, dtype=torch.float64).to(acc)
    beta = torch.randn(2, n, generator=gen, dtype=torch.float64).to(acc)
    x[0, 0, 0] = 0  # sign(0) = 0
    xd, ad, betad = x.to(dev), a.to(dev), beta.to(dev)
    check(ft.gram_pullback(xd, ad, None), ops.gram_pullback(x, a, None), OUT_TOL[dtype], "pullback")
    check(ft.gram_pullback(xd, ad, betad), ops.gram_pullback(x, a, beta), OUT_TOL[dtype], "pullback+beta")


@requires_extension
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_gram_pullback_scale(backend, dtype):
    """The per-input scale (the fused losses' upstream gradient) of any stride, NaN / Inf / 0 included,
    as the C++ op applies it; the backend's op takes it, or not (scale=None default)."""
    ft, ops, dev = kernels(backend), torch.ops.fastdiv, device_of(backend)
    x = make_x(4, 5, 37, dtype, seed=20)
    acc = acc_of(dtype)
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4, 5, 5, generator=gen, dtype=torch.float64).to(acc)
    beta = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(acc)
    diag = torch.diag_embed(torch.diagonal(a, dim1=1, dim2=2))
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    for what, scale in [("contiguous", torch.randn(4, generator=gen, dtype=torch.float64).to(acc)),
                        ("stride 0", torch.tensor(-1.5, dtype=acc).expand(4)),
                        ("stride 2 special", torch.tensor([math.nan, 7, math.inf, 7, 0, 7, 3, 7], dtype=acc)[::2])]:
        for coef, b in ((a, beta), (a, None), (diag, beta)):
            check(ft.gram_pullback(to(x), to(coef), to(b), to(scale)), ops.gram_pullback(x, coef, b, scale),
                  OUT_TOL[dtype], f"pullback scale {what} beta={b is not None}")
    t = namespace(backend)
    check(t.gram_pullback(to(x), to(a), to(beta)), ops.gram_pullback(x, a, beta), OUT_TOL[dtype], "op, scale defaulted")
    check(t.gram_pullback(to(x), to(a), to(beta), to(scale)), ops.gram_pullback(x, a, beta, scale), OUT_TOL[dtype],
          "op, scale")


@requires_extension
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("n,d", [(2, 1), (3, 7), (5, 100), (17, 33), (33, 60)], ids=str)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_gram_loss(backend, head, dtype, n, d):
    ft, ops = kernels(backend), torch.ops.fastdiv
    x = make_x(3, n, d, dtype, seed=7 * n + d)
    args = (head, EPS, JITTER, 0.0, RHO_MAX)
    check(ft.gram_loss(x.to(device_of(backend)), *args), ops.gram_loss(x, *args), acc_tol(dtype), head)


@requires_extension
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_gram_loss_half(backend, head, dtype):
    ft, ops = kernels(backend), torch.ops.fastdiv
    x = make_x(2, 5, 70, dtype, seed=3)
    args = (head, EPS, JITTER, 0.0, RHO_MAX)
    check(ft.gram_loss(x.to(device_of(backend)), *args), ops.gram_loss(x, *args), acc_tol(dtype), head)


@requires_extension
@pytest.mark.parametrize("head", ["kappa", "dpp"])
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_gram_loss_params(backend, head):
    """Non-default p, jitter and a rho_max below the sample's rho (the clamped, zero-gradient branch)."""
    ft, ops = kernels(backend), torch.ops.fastdiv
    x = make_x(2, 4, 9, torch.float64, seed=5) + 1.0  # rho well above 0
    for p, jitter, rho_max in ((5.0, 1e-2, RHO_MAX), (0.0, 1e-4, 0.3)):
        args = (head, EPS, jitter, p, rho_max)
        check(ft.gram_loss(x.to(device_of(backend)), *args), ops.gram_loss(x, *args), ACC_TOL[torch.float64],
              f"{head} {p} {rho_max}")


@requires_extension
@pytest.mark.parametrize("q", [1.0, 2.0, 3.5, math.inf], ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n,d", [(2, 1), (5, 100), (17, 1001)], ids=str)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_concentration_stats(backend, q, dtype, n, d):
    ft, ops = kernels(backend), torch.ops.fastdiv
    x = make_x(2, n, d, dtype, seed=n * d)
    check(ft.concentration_stats(x.to(device_of(backend)), q, EPS, JITTER, RHO_MAX),
          ops.concentration_stats(x, q, EPS, JITTER, RHO_MAX), acc_tol(dtype), "stats")


# layouts, empty batches, degenerate rows, NaN, Inf: every Gram-family launcher (test_rows.py: the row ones)


@requires_extension
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_strided_input(backend, layout, dtype):
    x = make_x(3, 5, 37, dtype, seed=11, layout=layout)
    assert not x.is_contiguous() and x.stride(2) == 1
    for name, actual, expected in launcher_results("gram", backend, x, op_inputs(x)):
        check(actual, expected, acc_tol(dtype), f"{layout} {name}")


@requires_extension
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_empty_batch(backend, dtype):
    x = torch.empty(0, 4, 6, dtype=dtype)
    for name, actual, expected in launcher_results("gram", backend, x, op_inputs(x)):
        check(actual, expected, acc_tol(dtype), f"B=0 {name}")


@requires_extension
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_zero_and_duplicate_rows(backend):
    """Zero rows (below the norm floor), duplicate rows (DPP near singular, max ties) and fully aligned
    rows (rho above rho_max), all finite and equal to the CPU ops."""
    check_zero_and_duplicate_rows("gram", backend)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_nan_input(backend, dtype):
    """A NaN entry makes that input's loss NaN (and its A, beta), leaves the other inputs alone."""
    x = make_x(3, 4, 10, dtype, seed=17)
    x[1, 2, 5] = math.nan
    for name, actual, expected in launcher_results("gram", backend, x, op_inputs(x)):
        check(actual, expected, acc_tol(dtype), f"NaN {name}")
        if name in HEADS:
            loss, a, beta, row_scale = actual
            assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all(), f"{name}: {loss}"
            assert torch.isnan(a[1]).all() and torch.isfinite(a[[0, 2]]).all()
            assert torch.isnan(beta[1]).all()
            assert (row_scale == 1).all()  # NaN rows are never rescaled: the NaN must reach the output
    stats = kernels(backend).concentration_stats(x.to(device_of(backend)), 2.0, EPS, JITTER, RHO_MAX)
    assert torch.isnan(stats[1]).all() and torch.isfinite(stats[[0, 2]]).all()


@requires_extension
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_inf_input(backend):
    x = make_x(2, 3, 8, torch.float64, seed=19)
    x[0, 1, 2] = math.inf
    for name, actual, expected in launcher_results("gram", backend, x, op_inputs(x)):
        check(actual, expected, ACC_TOL[torch.float64], f"Inf {name}")


# =====================================================================================================
# a GPU backend's op namespace on CUDA tensors against the C++ CPU ops
# =====================================================================================================


@requires_extension
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_raw_ops_match_cpu_kernels(backend, dtype, shape):
    """Every Gram-family op of the backend's namespace on its device against torch.ops.fastdiv on CPU
    tensors: same shapes, dtypes, contiguous outputs, values to the accumulation dtype's rounding."""
    check_raw_ops_match_cpu_kernels("gram", backend, dtype, shape)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_raw_ops_strided_input_match_cpu_kernels(backend, dtype):
    """The ops read strided B and n dims and misaligned rows in place: the same values as the CPU ops."""
    check_raw_ops_strided_input_match_cpu_kernels("gram", backend, dtype)


# =====================================================================================================
# The fused Triton forward (fastdiv/triton/fused.py): for n <= 32 one launch per gram_loss /
# concentration_stats call computes the Gram, the resultant and the n x n head; n > 32 keeps the Gram
# kernel + torch heads.
# =====================================================================================================

# BLOCK_N = 2, 4, 16, 32, 32: no padding, padding rows/columns, and the largest fused tile (full and not)
FUSED_N = [2, 3, 10, 17, 32]


@requires_extension
@pytest.mark.parametrize("n", FUSED_N + [33], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_fused_gram_loss(backend, head, n):
    """Every head against the C++ op, fp64 to fp64 rounding and fp32 to fp32 rounding; n = 33 is the
    two-launch fallback. d = 2 n + 3 keeps C + jitter I well conditioned (for n > d its condition number
    is ~ n / jitter and fp32 rounding of the Gram moves the DPP coefficients by ~1e-3 on every backend)."""
    from fastdiv.triton import fused as ft_fused

    ft, ops = kernels(backend), torch.ops.fastdiv
    assert ft_fused.can_fuse(n) == (n <= 32)
    args = (head, EPS, JITTER, 0.0, RHO_MAX)
    for dtype in (torch.float64, torch.float32):
        x = make_x(2, n, 2 * n + 3, dtype, seed=100 + n)
        xd = x.to(device_of(backend))
        x0 = xd.clone()
        check(ft.gram_loss(xd, *args), ops.gram_loss(x, *args), acc_tol(dtype), f"{head} n={n} {dtype_id(dtype)}")
        assert torch.equal(xd, x0), "the input was modified"


@requires_extension
@pytest.mark.parametrize("n", FUSED_N + [33], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_fused_concentration_stats(backend, n):
    ft, ops = kernels(backend), torch.ops.fastdiv
    q = (1.0, 2.5, math.inf)[n % 3]
    for dtype in (torch.float64, torch.float32):
        x = make_x(2, n, 2 * n + 3, dtype, seed=200 + n)
        check(ft.concentration_stats(x.to(device_of(backend)), q, EPS, JITTER, RHO_MAX),
              ops.concentration_stats(x, q, EPS, JITTER, RHO_MAX), acc_tol(dtype),
              f"stats n={n} q={q} {dtype_id(dtype)}")


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


@requires_extension
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_fused_special_rows(backend, dtype):
    """NaN input (that input's loss, A and beta all NaN, the others untouched), zero rows (below the norm
    floor: no direction, no gradient), duplicate rows (DPP near singular but finite) and exact ties of
    the max cosine (the first pair in row-major order, as the C++ loop), against the C++ op."""
    ft, ops = kernels(backend), torch.ops.fastdiv
    x = _special_batch(dtype)
    xd = x.to(device_of(backend))
    # cond(C + jitter I) ~ n / jitter for the duplicates: fp64 rounding times 1e5; in fp32 that is
    # ~1e-2, so there the DPP values are only checked for being finite
    tol = (1e-8, 1e-10) if dtype == torch.float64 else (1e-4, 1e-5)
    for head in HEADS:
        args = (head, EPS, JITTER, 0.0, RHO_MAX)
        got = ft.gram_loss(xd, *args)
        want = ops.gram_loss(x, *args)
        if dtype == torch.float64 or head != "dpp":
            check(got, want, tol, f"special {head}")
        loss, a, beta, _ = got
        assert torch.isnan(loss[0]) and torch.isnan(a[0]).all() and torch.isnan(beta[0]).all(), head
        assert torch.isfinite(loss[1:]).all() and torch.isfinite(a[1:]).all() and torch.isfinite(beta[1:]).all(), head
        if head != "sparsity":  # zero rows get no coefficients (sparsity: beta is -inv_r / n = 0 there too)
            assert (a[1, [1, 4]] == 0).all() and (a[1, :, [1, 4]] == 0).all(), head
        if head == "max":
            off = a[3] - torch.diag_embed(torch.diagonal(a[3]))
            assert off.nonzero().tolist() == [[0, 1], [1, 0]], off
    got = ft.concentration_stats(xd, 2.0, EPS, JITTER, RHO_MAX)
    want = ops.concentration_stats(x, 2.0, EPS, JITTER, RHO_MAX)
    if dtype == torch.float64:
        check(got, want, tol, "special stats")
    else:
        check(got[:, :5].contiguous(), want[:, :5].contiguous(), tol, "special stats (no dpp)")
    assert torch.isnan(got[0]).all() and torch.isfinite(got[1:]).all()


@requires_extension
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_fused_strided_input(backend, layout):
    """Strides on B and n go to the kernel as they are (no copy, the input untouched)."""
    ft, ops = kernels(backend), torch.ops.fastdiv
    x = make_x(2, 9, 21, torch.float64, seed=41, layout=layout)
    assert not x.is_contiguous() and x.stride(2) == 1
    x0 = x.clone()
    xd = x.to(device_of(backend))
    for head in HEADS:
        args = (head, EPS, JITTER, 0.0, RHO_MAX)
        check(ft.gram_loss(xd, *args), ops.gram_loss(x, *args), ACC_TOL[torch.float64], f"{layout} {head}")
    check(ft.concentration_stats(xd, 3.0, EPS, JITTER, RHO_MAX), ops.concentration_stats(x, 3.0, EPS, JITTER, RHO_MAX),
          ACC_TOL[torch.float64], f"{layout} stats")
    assert torch.equal(x, x0)


@pytest.mark.parametrize("backend", LAUNCHERS)
def test_fused_one_launch(backend, monkeypatch):
    """n <= 32: exactly one Triton kernel launch per gram_loss / concentration_stats call, through the
    public op namespace. What is counted: every `kernel[grid](...)` of any @triton.jit kernel in the
    process (the kernel class's run method, patched), by kernel name. Not counted: the torch allocations of
    the outputs, and above n = 32 the float64 torch heads after the Triton kernels (on a GPU those are
    further CUDA kernels). Also: repeated calls give the same bits (no atomics)."""
    from fastdiv.triton import fused as ft_fused

    launches = []
    cls = type(ft_fused._fused_kernel)
    run = cls.run

    def counting_run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", counting_run)
    t = namespace(backend)
    dev = device_of(backend)

    def launched(fn, *args):
        launches.clear()
        out = fn(*args)
        return out, list(launches)

    for n in (3, 32):
        x = make_x(2, n, 5, torch.float64, seed=n).to(dev)
        for head in HEADS:
            args = (x, head, EPS, JITTER, 0.0, RHO_MAX)
            first, names = launched(t.gram_loss, *args)
            assert names == ["_fused_kernel"], (head, n, names)
            again, _ = launched(t.gram_loss, *args)
            assert all(torch.equal(u, v) for u, v in zip(first, again)), f"{head}: not deterministic"
        _, names = launched(t.concentration_stats, x, 1.0, EPS, JITTER, RHO_MAX)
        assert names == ["_fused_kernel"], ("stats", n, names)
    _, names = launched(t.gram_loss, torch.empty(0, 4, 5, dtype=torch.float64, device=dev), "dpp", EPS, JITTER, 0.0,
                        RHO_MAX)
    assert names == []
    # the fallback above 32 samples: the Gram kernel, plus the resultant kernel when the head needs it
    x = make_x(1, 33, 5, torch.float64, seed=33).to(dev)
    for head, expected in (("dpp", ["_gram_kernel"]), ("kappa", ["_gram_kernel", "_resultant_kernel"])):
        _, names = launched(t.gram_loss, x, head, EPS, JITTER, 0.0, RHO_MAX)
        assert names == expected, (head, names)
    _, names = launched(t.concentration_stats, x, 1.0, EPS, JITTER, RHO_MAX)
    assert names == ["_gram_kernel", "_resultant_kernel"], names
