"""The row ops on every backend: normalize and normalize_pullback, column_stats and column_stats_pullback (the
kernels behind normalize, cosine_gram's norms and the variance penalties).

Their semantics against the reference, the autograd of any subset of their outputs (float64 gradcheck),
torch.library.opcheck, argument errors, and each backend's launchers and ops against the C++ CPU ops
(strided, empty, degenerate, NaN and Inf inputs). The public ops built on them: test_losses.py.
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
    LAUNCHERS,
    OP_SHAPES,
    OPCHECK,
    OUT_TOL,
    SEMANTICS,
    SHAPES,
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
from conftest import assert_close64, dtype_id, randn

# =====================================================================================================
# raw semantics
# =====================================================================================================


@pytest.mark.parametrize("backend", SEMANTICS)
def test_normalize_and_column_stats_ops(backend):
    ops = namespace(backend)
    x = randn(2, 4, 5, seed=7)
    assert_close64(ops.normalize(x, EPS), reference.unit_rows(x), "normalize")
    r, mean, var = ops.column_stats(x, EPS)
    u = reference.unit_rows(x)
    assert_close64(r, x.norm(dim=-1), "r")
    assert_close64(mean, u.mean(dim=1), "mean")
    assert_close64(var, u.var(dim=1, unbiased=False), "var")
    g = randn(2, 4, 5, seed=8)
    leaf = x.clone().requires_grad_()
    reference.unit_rows(leaf).backward(g)
    assert_close64(ops.normalize_pullback(x, g, EPS), leaf.grad, "normalize_pullback")


@pytest.mark.parametrize("outputs", [(0, 1, 2), (0,), (1,), (2,), (0, 2)],
                         ids=lambda o: "outputs" + "".join(map(str, o)))
@pytest.mark.parametrize("backend", SEMANTICS)
def test_column_stats_and_gram_grad_of_any_output_subset(backend, outputs):
    """The autograd of column_stats (r, mean, var) and gram (S, l1) with only some outputs used: the
    unused ones reach the backward as None (set_materialize_grads(False))."""
    ops = namespace(backend)
    x = randn(2, 3, 5, seed=17).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: tuple(ops.column_stats(t, EPS)[k] for k in outputs), (x,))
    gram_outputs = tuple(k for k in outputs if k < 2)
    if gram_outputs:
        assert torch.autograd.gradcheck(lambda t: tuple(ops.gram(t, True)[k] for k in gram_outputs), (x,))


#: norm floors below the norms of rows at 2^-100 (~1e-30; fp32, bf16) and 2^-700 (~1e-211; fp64)
TINY_EPS = {torch.float32: 1e-36, torch.bfloat16: 1e-36, torch.float64: 1e-300}


def _scaled_rows(dtype, k, seed=50):
    """(rows at scale 1, the same rows with input 0 at 2^k and row (1, 1) at 2^-k, the factors)."""
    f = torch.ones(2, 4, 1, dtype=torch.float64)
    f[0], f[1, 1] = 2.0**k, 2.0**-k
    base = randn(2, 4, 2049, seed=seed).to(dtype)  # D past the kernels' column tile
    return base, (base.double() * f).to(dtype), f


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("backend", SEMANTICS)
def test_row_ops_at_any_scale(backend, dtype):
    """Rows whose squares leave the accumulation range (fp32, bf16: 2^+-100; fp64: 2^+-700): u, the column
    statistics and both pullbacks are those of the same rows at scale 1 (r times the scale, pullbacks
    divided by it), to the rounding of the scaled data (exact: powers of two) and of the computation."""
    ops = namespace(backend)
    k = 700 if dtype == torch.float64 else 100
    base, x, f = _scaled_rows(dtype, k)
    eps = TINY_EPS[dtype]
    tol = ACC_TOL[torch.float64] if dtype == torch.float64 else OUT_TOL[dtype]
    close = lambda a, e, what: check(a.double().contiguous(), e.double().contiguous(), tol, what)  # noqa: E731
    close(ops.normalize(x, eps), ops.normalize(base, eps), "normalize")
    g = randn(2, 4, 2049, seed=51).to(dtype)
    close(ops.normalize_pullback(x, g, eps).double() * f, ops.normalize_pullback(base, g, eps),
          "normalize_pullback")
    r, mean, var = ops.column_stats(x, eps)
    r1, mean1, var1 = ops.column_stats(base, eps)
    close(r.double() / f[..., 0], r1, "r")
    close(mean, mean1, "mean")
    close(var, var1, "var")
    gr, gm, gv = (randn(*shape, seed=52 + i).to(r.dtype) for i, shape in enumerate([(2, 4), (2, 2049), (2, 2049)]))
    # the mean and variance of u scale their gradients with 1 / scale; r's (u itself) does not
    close(ops.column_stats_pullback(x, r, mean, None, gm, gv, eps).double() * f,
          ops.column_stats_pullback(base, r1, mean1, None, gm, gv, eps), "column_stats_pullback")
    close(ops.column_stats_pullback(x, r, mean, gr, None, None, eps),
          ops.column_stats_pullback(base, r1, mean1, gr, None, None, eps), "column_stats_pullback, grad_r")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_out_of_range_rows_match_cpu_kernels(backend, dtype):
    """The launchers on rows out of the range of their squares give the C++ CPU ops' values."""
    _, x, _ = _scaled_rows(dtype, 700 if dtype == torch.float64 else 100)
    for name, actual, expected in launcher_results("rows", backend, x, op_inputs(x)):
        check(actual, expected, acc_tol(dtype) if name != "normalize" else OUT_TOL[dtype], f"scaled {name}")


@pytest.mark.parametrize("backend", SEMANTICS)
def test_raw_row_op_errors(backend):
    ops = namespace(backend)
    x = randn(2, 3, 4, seed=18).float()
    for op in (ops.normalize, ops.column_stats):
        with pytest.raises(ValueError, match=r"\[B, n, D\]"):
            op(torch.randn(3, 4), EPS)
    with pytest.raises(ValueError, match="grad must match"):
        ops.normalize_pullback(x, torch.randn(2, 3, 5), EPS)
    r, mean, _ = ops.column_stats(x, EPS)
    with pytest.raises(ValueError, match="grad_var"):
        ops.column_stats_pullback(x, r, mean, None, None, torch.randn(2, 5), EPS)
    with pytest.raises(ValueError, match="mean must be"):
        ops.column_stats_pullback(x, r, torch.randn(3, 4), None, None, None, EPS)


# =====================================================================================================
# opcheck
# =====================================================================================================


def _x(dtype, requires_grad, backend, shape=(3, 4, 5), seed=9):
    return randn(*shape, seed=seed).to(dtype).to(device_of(backend)).requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("backend", OPCHECK)
def test_opcheck_normalize(backend, dtype):
    ops = namespace(backend)
    opcheck(ops.normalize.default, (_x(dtype, True, backend), EPS))
    opcheck(ops.normalize_pullback.default,
            (_x(dtype, False, backend), randn(3, 4, 5, seed=12).to(dtype).to(device_of(backend)), EPS))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("backend", OPCHECK)
def test_opcheck_column_stats(backend, dtype):
    ops = namespace(backend)
    dev = device_of(backend)
    opcheck(ops.column_stats.default, (_x(dtype, True, backend), EPS))
    x = _x(dtype, False, backend)
    r, mean, _ = ops.column_stats(x, EPS)
    g_r, g_m, g_v = (randn(*shape, seed=seed).to(dtype).to(dev) for shape, seed in (((3, 4), 13), ((3, 5), 14),
                                                                                    ((3, 5), 15)))
    opcheck(ops.column_stats_pullback.default, (x, r, mean, g_r, g_m, g_v, EPS))
    opcheck(ops.column_stats_pullback.default, (x, r, mean, None, None, g_v, EPS))


# =====================================================================================================
# a backend's launchers against the C++ CPU ops
# =====================================================================================================


@requires_extension
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n,d", SHAPES + [(33, 100)], ids=str)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_normalize(backend, dtype, n, d):
    ft, ops, dev = kernels(backend), torch.ops.fastdiv, device_of(backend)
    x = make_x(2, n, d, dtype, seed=d)
    g = make_x(2, n, d, dtype, seed=d + 1)
    check(ft.normalize(x.to(dev), EPS), ops.normalize(x, EPS), OUT_TOL[dtype], "normalize")
    check(ft.normalize_pullback(x.to(dev), g.to(dev), EPS), ops.normalize_pullback(x, g, EPS), OUT_TOL[dtype],
          "normalize_pullback")


@requires_extension
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n,d", SHAPES + [(33, 100)], ids=str)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_column_stats(backend, dtype, n, d):
    ft, ops, dev = kernels(backend), torch.ops.fastdiv, device_of(backend)
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    x = make_x(2, n, d, dtype, seed=n * 3 + d)
    expected = ops.column_stats(x, EPS)
    check(ft.column_stats(to(x), EPS), expected, acc_tol(dtype), "column_stats")
    r, mean, _ = expected
    gen = torch.Generator().manual_seed(2)
    gr, gm, gv = (torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in expected)
    for grads in ((gr, gm, gv), (None, gm, None), (gr, None, None), (None, None, gv), (None, None, None)):
        check(ft.column_stats_pullback(to(x), to(r), to(mean), *map(to, grads), EPS),
              ops.column_stats_pullback(x, r, mean, *grads, EPS),
              OUT_TOL[dtype], f"column_stats_pullback {[g is not None for g in grads]}")


# layouts, empty batches, degenerate rows, NaN, Inf: every row launcher (test_gram.py: the Gram-family ones)


@requires_extension
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_strided_input(backend, layout, dtype):
    x = make_x(3, 5, 37, dtype, seed=11, layout=layout)
    assert not x.is_contiguous() and x.stride(2) == 1
    for name, actual, expected in launcher_results("rows", backend, x, op_inputs(x)):
        check(actual, expected, acc_tol(dtype), f"{layout} {name}")


@requires_extension
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_empty_batch(backend, dtype):
    x = torch.empty(0, 4, 6, dtype=dtype)
    for name, actual, expected in launcher_results("rows", backend, x, op_inputs(x)):
        check(actual, expected, acc_tol(dtype), f"B=0 {name}")


@requires_extension
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_zero_and_duplicate_rows(backend):
    """Zero, duplicate, aligned and cancelling rows: finite and equal to the CPU ops."""
    check_zero_and_duplicate_rows("rows", backend)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_nan_input(backend, dtype):
    x = make_x(3, 4, 10, dtype, seed=17)
    x[1, 2, 5] = math.nan
    for name, actual, expected in launcher_results("rows", backend, x, op_inputs(x)):
        check(actual, expected, acc_tol(dtype), f"NaN {name}")


@requires_extension
@pytest.mark.parametrize("backend", LAUNCHERS)
def test_inf_input(backend):
    x = make_x(2, 3, 8, torch.float64, seed=19)
    x[0, 1, 2] = math.inf
    for name, actual, expected in launcher_results("rows", backend, x, op_inputs(x)):
        check(actual, expected, ACC_TOL[torch.float64], f"Inf {name}")


# =====================================================================================================
# a GPU backend's op namespace on CUDA tensors against the C++ CPU ops
# =====================================================================================================


@requires_extension
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_raw_ops_match_cpu_kernels(backend, dtype, shape):
    """Every row op of the backend's namespace on its device against torch.ops.fastdiv on CPU tensors."""
    check_raw_ops_match_cpu_kernels("rows", backend, dtype, shape)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_raw_ops_strided_input_match_cpu_kernels(backend, dtype):
    """The row ops read strided B and n dims and misaligned rows in place: the same values as the CPU ops."""
    check_raw_ops_strided_input_match_cpu_kernels("rows", backend, dtype)
