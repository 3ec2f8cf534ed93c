"""The torch.library ops behind the compiled backend (fastdiv/ops, fastdiv/csrc/ops.cpp): their raw semantics,
torch.library.opcheck, torch.compile(fullgraph=True), argument errors and the double-backward guard."""
from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import fastdiv
from fastdiv import reference

from conftest import LOSS_CASES, LOSS_IDS, STAT_FIELDS, assert_close64, randn, requires_extension

pytestmark = requires_extension

OPS = torch.ops.fastdiv if fastdiv.extension_built() else None
HEADS = ["dpp", "mean", "kappa", "max", "smoothmax", "gal", "mean_penalty", "sparsity"]
EPS, JITTER, RHO_MAX = 1e-12, 1e-4, 1 - 1e-6
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def test_every_op_is_covered():
    """The op list below is the library's: a new op must get its opcheck."""
    ops = {name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
           if name.startswith("fastdiv::")}
    assert ops == {"gram", "gram_pullback", "gram_loss", "concentration_stats", "normalize", "normalize_pullback",
                   "column_stats", "column_stats_pullback", "eot_step"}  # eot_step: opcheck in test_eot.py


# =====================================================================================================
# raw semantics
# =====================================================================================================


def test_gram_op():
    x = randn(3, 4, 700, seed=1)
    s, l1 = OPS.gram(x, True)
    assert_close64(s, x @ x.transpose(1, 2), "S = X X^T")
    assert_close64(l1, x.abs().sum(-1), "row l1")
    s32, l1_32 = OPS.gram(x.half(), False)
    assert s32.dtype == torch.float32 and l1_32.shape == (3, 0)  # fp32 accumulation for half inputs


def test_gram_pullback_op():
    x = randn(2, 3, 600, seed=2)
    a = randn(2, 3, 3, seed=3)
    beta = randn(2, 3, seed=4)
    assert_close64(OPS.gram_pullback(x, a, beta), a @ x + beta[:, :, None] * torch.sign(x), "A X + beta sign(X)")
    assert_close64(OPS.gram_pullback(x, a, None), a @ x, "A X")
    xh = x.half()
    out = OPS.gram_pullback(xh, a.float(), None)
    assert out.dtype == torch.float16  # dX has x's dtype


def test_gram_pullback_scale_op():
    """dX_b = scale_b (A_b X_b + beta_b sign(X_b)), bit for bit the unfused a * s, beta * s call, for a
    scale of any stride: contiguous, the stride-0 expansion autograd hands out, every other element."""
    x = randn(4, 5, 300, seed=30)
    a, beta = randn(4, 5, 5, seed=31), randn(4, 5, seed=32)
    s = randn(4, seed=33)
    for scale in (s, torch.tensor(-1.5, dtype=torch.float64).expand(4), randn(8, seed=34)[::2]):
        unfused = OPS.gram_pullback(x, a * scale[:, None, None], beta * scale[:, None])
        assert torch.equal(OPS.gram_pullback(x, a, beta, scale), unfused), scale.stride()
        assert_close64(OPS.gram_pullback(x, a, beta, scale),
                       scale[:, None, None] * (a @ x + beta[:, :, None] * torch.sign(x)), "s (A X + beta sign(X))")
        assert torch.equal(OPS.gram_pullback(x, a, None, scale), OPS.gram_pullback(x, a * scale[:, None, None], None))
    assert torch.equal(OPS.gram_pullback(x, a, beta, None), OPS.gram_pullback(x, a, beta))  # absent = 1
    # NaN / Inf / 0 scales as the unfused formula gives them, for the general and the diagonal-A fast path
    special = torch.tensor([math.nan, math.inf, 0.0, -2.0], dtype=torch.float64)
    for coef in (a, torch.diag_embed(torch.diagonal(a, dim1=1, dim2=2))):
        fused = OPS.gram_pullback(x, coef, beta, special)
        unfused = OPS.gram_pullback(x, coef * special[:, None, None], beta * special[:, None])
        torch.testing.assert_close(fused, unfused, rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(fused[0]).all() and torch.equal(fused[2], torch.zeros_like(fused[2]))
        assert torch.isfinite(fused[3]).all()
    xf = x.float()  # fp32 x takes an fp32 scale
    torch.testing.assert_close(OPS.gram_pullback(xf, a.float(), beta.float(), s.float()),
                               OPS.gram_pullback(xf, (a * s[:, None, None]).float(), (beta * s[:, None]).float()))


def test_gram_loss_backward_is_one_pullback_launch():
    """The fused loss's backward hands grad_loss to the kernel as its scale: no a * g, beta * g launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    for head in ("dpp", "sparsity"):
        x = randn(3, 4, 9, seed=35).requires_grad_()
        loss, grad_loss = OPS.gram_loss(x, head, EPS, JITTER, 0.0, RHO_MAX)[0], randn(3, seed=36)
        with Record() as record:
            torch.autograd.grad(loss, x, grad_loss)
        assert record.ops == ["fastdiv.gram_pullback.default"], (head, record.ops)


@pytest.mark.parametrize("head", HEADS)
def test_gram_loss_op_matches_public_loss(head):
    x = randn(3, 4, 9, seed=5)
    loss, a, beta = OPS.gram_loss(x, head, EPS, JITTER, 0.0, RHO_MAX)
    assert a.shape == (3, 4, 4) and torch.allclose(a, a.transpose(1, 2))  # symmetric pullback matrix
    assert beta.shape == ((3, 4) if head == "sparsity" else (3, 0))
    public = {"dpp": reference.dpp_loss, "mean": reference.mean_cosine_loss, "kappa": reference.kappa_loss,
              "max": reference.max_cosine_loss, "smoothmax": reference.smoothmax_cosine_loss,
              "gal": reference.gal_loss, "mean_penalty": reference.mean_penalty,
              "sparsity": reference.sparsity_penalty}[head]
    assert_close64(loss, public(x), head)
    # the pullback coefficients give the loss's gradient: dL/dX = A X + beta sign(X)
    leaf = x.clone().requires_grad_()
    public(leaf).sum().backward()
    assert_close64(OPS.gram_pullback(x, a, beta if beta.numel() else None), leaf.grad, "pullback", rtol=1e-8)


def test_concentration_stats_op_column_order():
    x = randn(3, 5, 8, seed=6)
    out = OPS.concentration_stats(x, 3.0, EPS, JITTER, RHO_MAX)
    expected = reference.concentration_stats(x, 3.0, JITTER, RHO_MAX, EPS)
    assert out.shape == (3, 6)
    for k, field in enumerate(STAT_FIELDS):
        assert_close64(out[:, k], getattr(expected, field), field)


def test_normalize_and_column_stats_ops():
    x = randn(2, 4, 5, seed=7)
    assert_close64(OPS.normalize(x, EPS), reference.unit_rows(x), "normalize")
    r, mean, var = OPS.column_stats(x, EPS)
    u = reference.unit_rows(x)
    assert_close64(r, x.norm(dim=-1), "r")
    assert_close64(mean, u.mean(dim=1), "mean")
    assert_close64(var, u.var(dim=1, unbiased=False), "var")
    g = randn(2, 4, 5, seed=8)
    leaf = x.clone().requires_grad_()
    reference.unit_rows(leaf).backward(g)
    assert_close64(OPS.normalize_pullback(x, g, EPS), leaf.grad, "normalize_pullback")


# =====================================================================================================
# opcheck
# =====================================================================================================


def _x(dtype, requires_grad, shape=(3, 4, 5), seed=9):
    return randn(*shape, seed=seed).to(dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("head", HEADS)
def test_opcheck_gram_loss(head, dtype):
    for p, rho_max in [(0.0, RHO_MAX), (2.5, 0.9)]:
        opcheck(OPS.gram_loss.default, (_x(dtype, True), head, EPS, JITTER, p, rho_max))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("with_l1", [True, False])
def test_opcheck_gram(with_l1, dtype):
    opcheck(OPS.gram.default, (_x(dtype, True), with_l1))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_opcheck_gram_pullback(dtype):
    x = _x(dtype, False)
    acc = dtype
    a, beta = randn(3, 4, 4, seed=10).to(acc), randn(3, 4, seed=11).to(acc)
    opcheck(OPS.gram_pullback.default, (x, a, beta))
    opcheck(OPS.gram_pullback.default, (x, a, None))
    scale = randn(3, seed=12).to(acc)
    opcheck(OPS.gram_pullback.default, (x, a, beta, scale))
    opcheck(OPS.gram_pullback.default, (x, a, None, scale[:1].expand(3)))  # stride 0


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("q", [1.0, 2.0, math.inf])
def test_opcheck_concentration_stats(q, dtype):
    opcheck(OPS.concentration_stats.default, (_x(dtype, False), q, EPS, JITTER, RHO_MAX))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_opcheck_normalize(dtype):
    opcheck(OPS.normalize.default, (_x(dtype, True), EPS))
    opcheck(OPS.normalize_pullback.default, (_x(dtype, False), randn(3, 4, 5, seed=12).to(dtype), EPS))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_opcheck_column_stats(dtype):
    opcheck(OPS.column_stats.default, (_x(dtype, True), EPS))
    x = _x(dtype, False)
    r, mean, _ = OPS.column_stats(x, EPS)
    g_r, g_m, g_v = randn(3, 4, seed=13).to(dtype), randn(3, 5, seed=14).to(dtype), randn(3, 5, seed=15).to(dtype)
    opcheck(OPS.column_stats_pullback.default, (x, r, mean, g_r, g_m, g_v, EPS))
    opcheck(OPS.column_stats_pullback.default, (x, r, mean, None, None, g_v, EPS))


def test_opcheck_half_and_noncontiguous_inputs():
    """Half inputs (fp32 outputs) and strided [B, n] dims go through the fake kernels too."""
    base = randn(4, 8, 6, seed=16)
    for x in (base.half(), base.bfloat16(), base[::2, ::2].float()):
        opcheck(OPS.gram_loss.default, (x.detach().requires_grad_(), "dpp", EPS, JITTER, 0.0, RHO_MAX))
        opcheck(OPS.concentration_stats.default, (x, 1.0, EPS, JITTER, RHO_MAX))
        opcheck(OPS.column_stats.default, (x.detach().requires_grad_(), EPS))


@pytest.mark.parametrize("outputs", [(0, 1, 2), (0,), (1,), (2,), (0, 2)],
                         ids=lambda o: "outputs" + "".join(map(str, o)))
def test_column_stats_and_gram_grad_of_any_output_subset(outputs):
    """The autograd of column_stats (r, mean, var) and gram (S, l1) with only some outputs used: the
    unused ones reach the backward as None (set_materialize_grads(False))."""
    x = randn(2, 3, 5, seed=17).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: tuple(OPS.column_stats(t, EPS)[k] for k in outputs), (x,))
    gram_outputs = tuple(k for k in outputs if k < 2)
    if gram_outputs:
        assert torch.autograd.gradcheck(lambda t: tuple(OPS.gram(t, True)[k] for k in gram_outputs), (x,))


# =====================================================================================================
# raw op errors
# =====================================================================================================


def test_raw_op_errors():
    x = randn(2, 3, 4, seed=18).float()
    with pytest.raises(ValueError, match="head"):
        OPS.gram_loss(x, "foo", EPS, JITTER, 0.0, RHO_MAX)
    with pytest.raises(ValueError, match="head"):
        OPS.gram_loss(x, "DPP", EPS, JITTER, 0.0, RHO_MAX)
    with pytest.raises(ValueError, match=r"\[B, n, D\]"):
        OPS.gram_loss(torch.randn(3, 4), "dpp", EPS, JITTER, 0.0, RHO_MAX)
    with pytest.raises(ValueError, match=r"\[B, n, D\]"):
        OPS.gram_loss(torch.randn(1, 3, 4, 5), "dpp", EPS, JITTER, 0.0, RHO_MAX)
    with pytest.raises(ValueError, match="n >= 2"):
        OPS.gram_loss(torch.randn(2, 1, 4), "dpp", EPS, JITTER, 0.0, RHO_MAX)
    with pytest.raises(ValueError, match="n >= 2"):
        OPS.concentration_stats(torch.randn(2, 1, 4), 1.0, EPS, JITTER, RHO_MAX)
    with pytest.raises(ValueError, match="q"):
        OPS.concentration_stats(x, 0.5, EPS, JITTER, RHO_MAX)
    with pytest.raises(TypeError, match="float32, float64"):
        OPS.gram(torch.ones(2, 3, 4, dtype=torch.int32), False)
    with pytest.raises(ValueError, match="unit stride"):
        OPS.gram(torch.randn(2, 3, 8)[:, :, ::2], False)
    for op, args in [(OPS.normalize, (EPS,)), (OPS.column_stats, (EPS,)), (OPS.gram, (False,))]:
        with pytest.raises(ValueError, match=r"\[B, n, D\]"):
            op(torch.randn(3, 4), *args)
    with pytest.raises(ValueError, match=r"a must be \[2, 3, 3\]"):
        OPS.gram_pullback(x, torch.randn(2, 3, 4), None)
    with pytest.raises(ValueError, match="a must be"):  # fp64 coefficients for an fp32 x
        OPS.gram_pullback(x, torch.randn(2, 3, 3, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="beta must be"):
        OPS.gram_pullback(x, torch.randn(2, 3, 3), torch.randn(2, 4))
    for bad in (torch.randn(3), torch.randn(2, 1), torch.randn(2, dtype=torch.float64), torch.empty(0)):
        with pytest.raises(ValueError, match=r"scale must be \[2\]"):
            OPS.gram_pullback(x, torch.randn(2, 3, 3), None, bad)
    with pytest.raises(ValueError, match="grad must match"):
        OPS.normalize_pullback(x, torch.randn(2, 3, 5), EPS)
    r, mean, _ = OPS.column_stats(x, EPS)
    with pytest.raises(ValueError, match="grad_var"):
        OPS.column_stats_pullback(x, r, mean, None, None, torch.randn(2, 5), EPS)
    with pytest.raises(ValueError, match="mean must be"):
        OPS.column_stats_pullback(x, r, torch.randn(3, 4), None, None, None, EPS)


# =====================================================================================================
# double backward is rejected by the fused kernels (fastdiv/ops/_common.py)
# =====================================================================================================


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_double_backward_raises(case):
    x = randn(2, 3, 4, seed=19).requires_grad_()
    (g,) = torch.autograd.grad(case(x, backend="cpu"), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.square().sum().backward()


@pytest.mark.parametrize("fn", [fastdiv.normalize, fastdiv.cosine_gram], ids=["normalize", "cosine_gram"])
def test_double_backward_raises_normalize_cosine_gram(fn):
    x = randn(2, 3, 4, seed=20).requires_grad_()
    out = fn(x, backend="cpu")
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


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("fn", [several_losses, sample_dim0_losses], ids=["several_losses", "sample_dim0"])
def test_compile_fullgraph(fn, compile_backend):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    for shape in [(3, 5, 2, 7), (4, 5, 2, 7)]:  # a second batch size: recompiles (automatic dynamic)
        x = randn(*shape, seed=21).float()
        (e, ge), (c, gc) = eager_and_compiled(fn, x, compiled)
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    compiled = torch.compile(several_losses, fullgraph=True)
    x = randn(3, 5, 2, 7, seed=22).float()
    (e, ge), (c, gc) = eager_and_compiled(several_losses, x, compiled)
    torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


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


def test_compile_fullgraph_float_argument_varies():
    """A hyperparameter passed as a Python float that changes between calls (a schedule)."""
    torch._dynamo.reset()
    fn = lambda g, jitter, t: fastdiv.dpp_loss(g, jitter=jitter) + fastdiv.variance_penalty(  # noqa: E731
        g, kind="softmin", temperature=t)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = randn(3, 4, 6, seed=24).float()
    for jitter, t in [(1e-4, 0.5), (1e-3, 0.25), (1e-2, 0.125)]:
        torch.testing.assert_close(compiled(x, jitter, t), fn(x, jitter, t), rtol=1e-6, atol=1e-6)


def test_compile_empty_batch():
    torch._dynamo.reset()
    fn = lambda g: fastdiv.dpp_loss(g) + fastdiv.kappa_loss(g, reduction="sum") + fastdiv.variance_penalty(g)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = torch.zeros(0, 5, 2, 7, requires_grad=True)
    out = compiled(x)
    assert out.item() == 0.0
    out.backward()
    assert x.grad.shape == x.shape


def test_python_schemas_match_the_cpp_library():
    """fastdiv/ops/schemas.py (used to define the Triton namespace) must not drift from fastdiv/csrc/ops.cpp."""
    from fastdiv.ops.schemas import SCHEMAS

    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.fastdiv, name).default._schema) == f"fastdiv::{schema}"
    cpp_ops = {op for op in dir(torch.ops.fastdiv) if not op.startswith("_") and
               isinstance(getattr(torch.ops.fastdiv, op), torch._ops.OpOverloadPacket)}
    assert cpp_ops == set(SCHEMAS)


# =====================================================================================================
# thread count
# =====================================================================================================


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_results_do_not_depend_on_the_thread_count(dtype):
    """The CPU kernels split the batch (or the rows) over threads, never a reduction, so 1, 2 and 3
    threads give the same bits. B = 13 with n = 4, D = 2049 is above the split grain (batch_grain in
    fastdiv/csrc/cpu/tile.h), so 2 and 3 threads really split it, unevenly for 3."""
    x = randn(13, 4, 2049, seed=5).to(dtype)
    x0 = randn(13, 2049, seed=6).to(dtype)

    def everything():
        out = []
        for case in LOSS_CASES:
            leaf = x.clone().requires_grad_()
            value = case(leaf, backend="cpu", reduction="none")
            (value * torch.arange(1, 14, dtype=value.dtype)).sum().backward()
            out += [value.detach(), leaf.grad]
        out += list(fastdiv.concentration_stats(x, backend="cpu"))
        out.append(fastdiv.normalize(x, backend="cpu"))
        for norm in ("linf", "l2"):
            out += list(fastdiv.eot_step(x0, x0, x.transpose(0, 1), alpha=0.01, eps=0.03, norm=norm,
                                         backend="cpu"))
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
