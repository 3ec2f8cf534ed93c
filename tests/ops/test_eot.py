"""fastdiv.eot_step on every backend: the reference against hand-written torchattacks-style steps, the C++ CPU
and Triton (interpreter) kernels and, on a GPU, the CUDA and compiled Triton kernels against the reference
and the CPU kernels; projection properties, per-example alpha/eps, strides and sample_dim, the empty batch,
zero gradients, NaN, determinism, argument errors and the op's torch.library registration (opcheck)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

from fastdiv import reference
from fastdiv.eot import eot_step

from ._helpers import ALL_DTYPES, CPU_BACKEND, backends, device_of, gpu_randn, namespace, requires_extension
from conftest import dtype_id

#: the fused backends on CPU tensors, with the reference for the property tests
BACKENDS = backends("cpu", "triton:cpu")
ALL_BACKENDS = backends("cpu", "triton:cpu", "torch")
#: the tests sized for, or written for, a GPU
GPU_SIDE = backends("cuda", "triton:gpu")
DT = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FEATURES = (3, 29, 31)  # D = 2697: crosses the C++ tile (2048) and the Triton block (1024)
EPS8 = 8 / 255


def make(batch=3, n=4, features=FEATURES, *, dtype=torch.float64, seed=0, sample_dim=0, eps=EPS8):
    """x0 in [0, 1], x inside the eps-ball around it and in [0, 1], n gradients of mixed scale."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, *features, generator=gen, dtype=torch.float64)
    x = (x0 + (torch.rand(x0.shape, generator=gen, dtype=torch.float64) * 2 - 1) * eps).clamp(0, 1)
    shape = (n, batch, *features) if sample_dim == 0 else (batch, n, *features)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(dtype), x0.to(dtype), g.to(dtype)


def momentum_like(x, seed=5, scale=1e-3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(x.shape, generator=gen, dtype=torch.float64) * scale).to(x.dtype)


def assert_out_close(got, want, dtype, what=""):
    """fp64: 1e-12; otherwise a few ulps of the output dtype (values are O(1))."""
    tol = 1e-12 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# =====================================================================================================
# the reference against independent, torchattacks-style formulas
# =====================================================================================================


def test_reference_linf_is_torchattacks_pgd_step():
    x, x0, g = make()
    alpha, eps = 2 / 255, EPS8
    grad = g.mean(0)
    adv = x + alpha * grad.sign()
    delta = torch.clamp(adv - x0, min=-eps, max=eps)
    want = torch.clamp(x0 + delta, min=0, max=1)
    got = reference.eot_step(x, x0, g, alpha=alpha, eps=eps)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_reference_l2_is_torchattacks_pgdl2_step():
    x, x0, g = make(seed=1)
    alpha, eps = 0.2, 0.5
    b = x.shape[0]
    grad = g.mean(0)
    grad = grad / torch.linalg.vector_norm(grad.reshape(b, -1), dim=1).reshape(b, 1, 1, 1)
    adv = x + alpha * grad
    delta = adv - x0
    factor = torch.clamp(eps / torch.linalg.vector_norm(delta.reshape(b, -1), dim=1), max=1.0).reshape(b, 1, 1, 1)
    want = torch.clamp(x0 + delta * factor, 0, 1)
    got = reference.eot_step(x, x0, g, alpha=alpha, eps=eps, norm="l2")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_momentum_is_torchattacks_mifgsm():
    """torchattacks MIFGSM normalizes by mean |g|: its buffer is D times ours, the steps are identical."""
    x0, _, _ = make(seed=2)
    alpha, eps, decay = 2 / 255, EPS8, 0.9
    d = x0[0].numel()
    adv_ta, m_ta = x0.clone(), torch.zeros_like(x0)
    adv, m = x0.clone(), torch.zeros_like(x0)
    for step in range(4):
        _, _, g = make(seed=10 + step)
        grad = g.mean(0)
        grad = grad / torch.mean(torch.abs(grad), dim=(1, 2, 3), keepdim=True)
        grad = grad + m_ta * decay
        m_ta = grad
        adv_ta = adv_ta + alpha * grad.sign()
        delta = torch.clamp(adv_ta - x0, min=-eps, max=eps)
        adv_ta = torch.clamp(x0 + delta, min=0, max=1)
        adv, m = reference.eot_step(adv, x0, g, alpha=alpha, eps=eps, momentum=m, decay=decay)
        torch.testing.assert_close(adv, adv_ta, rtol=0, atol=0)
        torch.testing.assert_close(m * d, m_ta, rtol=1e-12, atol=1e-12)


# =====================================================================================================
# kernels against the reference
# =====================================================================================================


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("with_momentum", [False, True], ids=["plain", "momentum"])
@pytest.mark.parametrize("dtype", list(DT), ids=list(DT.values()))
def test_matches_reference(backend, norm, with_momentum, dtype):
    x, x0, g = make(dtype=dtype, seed=3)
    kw = dict(alpha=1.5 / 255 if norm == "linf" else 0.3, eps=EPS8 if norm == "linf" else 0.5, norm=norm)
    if with_momentum:
        m = momentum_like(x)
        got, m_got = eot_step(x, x0, g, momentum=m, decay=0.9, backend=backend, **kw)
        want, m_want = reference.eot_step(x, x0, g, momentum=m, decay=0.9, **kw)
        assert m_got.dtype == dtype and m_got.shape == x.shape
        scale = m_want.abs().max().item()
        tol = 1e-12 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(m_got.double(), m_want.double(), rtol=tol, atol=tol * scale)
    else:
        got = eot_step(x, x0, g, backend=backend, **kw)
        want = reference.eot_step(x, x0, g, **kw)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.isfinite(got).all()
    assert_out_close(got, want, dtype, f"{backend} {norm} {DT[dtype]}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_example_alpha_eps(backend, norm):
    x, x0, g = make(batch=4, seed=4)
    alpha = torch.tensor([0.0, 0.01, 0.5, 2.0], dtype=torch.float64)
    eps = torch.tensor([0.05, 0.0, 0.2, 1.0], dtype=torch.float64)
    got = eot_step(x, x0, g, alpha=alpha, eps=eps, norm=norm, backend=backend)
    want = reference.eot_step(x, x0, g, alpha=alpha, eps=eps, norm=norm)
    assert_out_close(got, want, torch.float64)
    # example 0: alpha = 0 is a pure projection of x; example 1: eps = 0 returns x0
    delta = x[0] - x0[0]
    proj = (delta.clamp(-0.05, 0.05) if norm == "linf"
            else delta * min(1.0, 0.05 / torch.linalg.vector_norm(delta).item()))
    torch.testing.assert_close(got[0], x0[0] + proj, rtol=0, atol=1e-15)
    torch.testing.assert_close(got[1], x0[1], rtol=0, atol=0)
    # the per-example step equals the scalar step of each example alone
    for i in range(4):
        alone = eot_step(x[i:i + 1], x0[i:i + 1], g[:, i:i + 1], alpha=alpha[i].item(), eps=eps[i].item(), norm=norm,
                         backend=backend)
        torch.testing.assert_close(got[i:i + 1], alone, rtol=0, atol=0)
    # a 0-dim tensor is a scalar for every example
    one = eot_step(x, x0, g, alpha=torch.tensor(0.01), eps=torch.tensor(0.05), norm=norm, backend=backend)
    torch.testing.assert_close(one, eot_step(x, x0, g, alpha=0.01, eps=0.05, norm=norm, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_sample_dim_and_strides(backend, norm):
    x, x0, g = make(batch=3, n=5, features=(2, 7, 9), seed=6)
    kw = dict(alpha=0.05, eps=0.1, norm=norm, backend=backend)
    base = eot_step(x, x0, g, **kw)
    torch.testing.assert_close(base, reference.eot_step(x, x0, g, alpha=0.05, eps=0.1, norm=norm), rtol=1e-12,
                               atol=1e-12)
    # [B, n, *features], contiguous and as a transposed view of the [n, B] layout
    torch.testing.assert_close(eot_step(x, x0, g.transpose(0, 1).contiguous(), sample_dim=1, **kw), base,
                               rtol=0, atol=0)
    torch.testing.assert_close(eot_step(x, x0, g.transpose(0, 1), sample_dim=1, **kw), base, rtol=0, atol=0)
    # strided n and B dims (every other sample of a larger stack / every other example)
    big = torch.zeros(10, 6, 2, 7, 9, dtype=torch.float64)
    big[::2, ::2] = g
    torch.testing.assert_close(eot_step(x, x0, big[::2, ::2], **kw), base, rtol=0, atol=0)
    # non-unit feature strides (copied), strided x / x0 / momentum
    gt = g.transpose(3, 4).contiguous().transpose(3, 4)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    x0_big = torch.zeros(6, 2, 7, 9, dtype=torch.float64)
    x0_big[::2] = x0
    torch.testing.assert_close(eot_step(xt, x0_big[::2], gt, **kw), base, rtol=0, atol=0)
    m = momentum_like(x)
    m_big = torch.zeros(6, 2, 7, 9, dtype=torch.float64)
    m_big[::2] = m
    got, m_new = eot_step(x, x0, g, momentum=m_big[::2], **kw)
    want, m_want = eot_step(x, x0, g, momentum=m, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(m_new, m_want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_promote(backend):
    x, x0, g = make(features=(4, 5), seed=7)
    got = eot_step(x.half(), x0.half(), g.float(), alpha=0.01, eps=0.03, backend=backend)
    want = reference.eot_step(x.half(), x0.half(), g.float(), alpha=0.01, eps=0.03)
    assert got.dtype == torch.float16
    assert_out_close(got, want, torch.float16)


# =====================================================================================================
# properties and degenerate inputs
# =====================================================================================================


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_projection_and_clip(backend, norm, dtype):
    x, x0, g = make(batch=5, seed=8, dtype=dtype)
    eps = torch.tensor([0.0, 0.01, 0.1, 0.5, 3.0], dtype=torch.float64)
    alpha = 10.0  # far outside the ball: the projection is active
    got = eot_step(x, x0, g, alpha=alpha, eps=eps, norm=norm, backend=backend).double()
    delta = (got - x0.double()).flatten(1)
    slack = 1e-12 if dtype == torch.float64 else 1e-6
    if norm == "linf":
        assert (delta.abs().amax(1) <= eps + slack).all()
    else:
        assert (torch.linalg.vector_norm(delta, dim=1) <= eps * (1 + (1e-6 if dtype == torch.float64 else 1e-5))
                + slack).all()
    assert (got >= 0).all() and (got <= 1).all()
    narrow = eot_step(x, x0, g, alpha=alpha, eps=eps, norm=norm, clip=(0.25, 0.5), backend=backend)
    assert (narrow >= 0.25).all() and (narrow <= 0.5).all()
    # without clip the l_inf step lands exactly on the ball's surface where it was pushed outward
    free = eot_step(x, x0, g, alpha=alpha, eps=eps, norm=norm, clip=None, backend=backend).double()
    free_delta = (free - x0.double()).flatten(1)
    if norm == "linf":
        torch.testing.assert_close(free_delta.abs(), eps[:, None].expand_as(free_delta), rtol=1e-6, atol=slack)
    else:
        torch.testing.assert_close(torch.linalg.vector_norm(free_delta, dim=1), eps, rtol=1e-5, atol=slack)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_single_sample_is_a_plain_step(backend):
    x, x0, g = make(n=1, seed=9)
    alpha, eps = 2 / 255, EPS8
    want = torch.clamp(x0 + torch.clamp(x + alpha * g[0].sign() - x0, -eps, eps), 0, 1)
    got = eot_step(x, x0, g, alpha=alpha, eps=eps, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_inputs_not_modified(backend, norm):
    x, x0, g = make(seed=10)
    m = momentum_like(x)
    alpha = torch.full((3,), 0.02, dtype=torch.float64)
    eps = torch.full((3,), 0.05, dtype=torch.float64)
    before = [t.clone() for t in (x, x0, g, m, alpha, eps)]
    out, m_new = eot_step(x, x0, g, alpha=alpha, eps=eps, norm=norm, momentum=m, backend=backend)
    for t, b in zip((x, x0, g, m, alpha, eps), before):
        assert torch.equal(t, b)
    assert out.data_ptr() not in {t.data_ptr() for t in (x, x0, g, m)}
    assert m_new.data_ptr() != m.data_ptr()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_empty_batch(backend, norm):
    x, x0, g = make(batch=0, features=(3, 4))
    out = eot_step(x, x0, g, alpha=0.1, eps=0.1, norm=norm, backend=backend)
    assert out.shape == (0, 3, 4) and out.dtype == x.dtype
    out, m = eot_step(x, x0, g, alpha=torch.zeros(0), eps=torch.zeros(0), norm=norm, momentum=torch.zeros_like(x),
                      backend=backend)
    assert out.shape == (0, 3, 4) and m.shape == (0, 3, 4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_gradients(backend, norm):
    x, x0, g = make(seed=11)
    g = torch.zeros_like(g)
    eps = EPS8 if norm == "linf" else 100.0  # x is inside both balls
    out = eot_step(x, x0, g, alpha=0.1, eps=eps, norm=norm, backend=backend)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-15)  # no direction: x (already in the ball) stays
    out, m = eot_step(x, x0, g, alpha=0.1, eps=eps, norm=norm, momentum=torch.zeros_like(x), backend=backend)
    assert torch.equal(m, torch.zeros_like(x))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-15)
    # a zero gradient with a nonzero buffer steps along the decayed buffer
    m0 = momentum_like(x)
    out, m = eot_step(x, x0, g, alpha=0.1, eps=EPS8, norm=norm, momentum=m0, decay=0.5, backend=backend)
    torch.testing.assert_close(m, 0.5 * m0, rtol=0, atol=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("with_momentum", [False, True], ids=["plain", "momentum"])
def test_nan_stays_in_its_example(backend, norm, with_momentum):
    x, x0, g = make(seed=12)
    g[2, 1, 0, 3, 4] = math.nan
    m = momentum_like(x) if with_momentum else None
    res = eot_step(x, x0, g, alpha=0.02, eps=EPS8, norm=norm, momentum=m, backend=backend)
    out = res[0] if with_momentum else res
    assert torch.isnan(out[1]).any()
    assert torch.isfinite(out[[0, 2]]).all()
    want = reference.eot_step(x, x0, g, alpha=0.02, eps=EPS8, norm=norm, momentum=m)
    want = want[0] if with_momentum else want
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    if with_momentum:
        assert torch.isnan(res[1][1]).all() and torch.isfinite(res[1][[0, 2]]).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_not_differentiable_inputs_are_detached(backend):
    x, x0, g = make(features=(4, 5), seed=13)
    x.requires_grad_()
    g.requires_grad_()
    out = eot_step(x, x0, g, alpha=0.01, eps=0.03, backend=backend)
    assert not out.requires_grad


# =====================================================================================================
# argument errors
# =====================================================================================================


def _bad_cases():
    x, x0, g = make(features=(4, 5))
    return [
        (dict(x0=x0[:, :3]), ValueError, "x0"),
        (dict(grads=g[:, :2]), ValueError, "grads"),
        (dict(grads=g[..., :4]), ValueError, "grads"),
        (dict(grads=g[0]), ValueError, "grads"),  # no sample dim
        (dict(grads=g[:0]), ValueError, "gradient samples"),
        (dict(grads=g.transpose(0, 1)), ValueError, "grads"),  # [B, n] given as sample_dim=0
        (dict(x=x.long()), TypeError, "x"),
        (dict(grads=g.int()), TypeError, "grads"),
        (dict(x=[1.0]), TypeError, "x"),
        (dict(x=x.to("meta")), ValueError, "on"),
        (dict(norm="l1"), ValueError, "norm"),
        (dict(eps=-0.1), ValueError, "eps"),
        (dict(eps=math.nan), ValueError, "eps"),
        (dict(alpha=-1e-3), ValueError, "alpha"),
        (dict(alpha=math.inf), ValueError, "alpha"),
        (dict(alpha="0.1"), TypeError, "alpha"),
        (dict(eps=torch.tensor([0.1, -0.1, 0.1], dtype=torch.float64)), ValueError, "eps"),
        (dict(alpha=torch.tensor([0.1, math.nan, 0.1])), ValueError, "alpha"),
        (dict(eps=torch.full((2,), 0.1)), ValueError, "eps"),
        (dict(clip=(1.0, 0.0)), ValueError, "clip"),
        (dict(clip=0.5), TypeError, "clip"),
        (dict(momentum=torch.zeros(3, 4)), ValueError, "momentum"),
        (dict(momentum=torch.zeros(3, 4, 5, dtype=torch.int32)), TypeError, "momentum"),
        (dict(decay=-0.5), ValueError, "decay"),
        (dict(sample_dim=2), ValueError, "sample_dim"),
        (dict(backend="fast"), ValueError, "backend"),
    ], dict(x=x, x0=x0, grads=g, alpha=0.01, eps=0.03)


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
def test_bad_input(case):
    cases, base = _bad_cases()
    change, exc, match = cases[case]
    kw = {**base, **change}
    with pytest.raises(exc, match=match):
        eot_step(kw.pop("x"), kw.pop("x0"), kw.pop("grads"), **kw)


# =====================================================================================================
# the op (torch.library)
# =====================================================================================================


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_opcheck(backend, dtype):
    import fastdiv.ops  # noqa: F401  (registers the fake kernels)

    op = namespace(backend).eot_step.default
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, x0, g = make(batch=3, n=2, features=(5, 7), dtype=dtype, seed=14)
    xv, x0v, rows = x.flatten(1), x0.flatten(1), g.transpose(0, 1).flatten(2)
    alpha = torch.full((3,), 0.01, dtype=acc)
    eps = torch.tensor([0.0, 0.03, 1.0], dtype=acc)
    m = momentum_like(xv).to(acc)
    for norm in ("linf", "l2"):
        for momentum in (None, m):
            for clip in (True, False):
                opcheck(op, (xv, x0v, rows, alpha, eps, norm, 0.0, 1.0, clip, momentum, 0.9),
                        test_utils=("test_schema", "test_faketensor"))
    out, m_out = op(xv, x0v, rows, alpha, eps, "linf", 0.0, 1.0, True, None, 1.0)
    assert out.dtype == dtype and out.shape == (3, 35) and m_out.shape == (3, 0) and m_out.dtype == acc


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_backward_raises(backend):
    import fastdiv.ops  # noqa: F401

    op = namespace(backend).eot_step
    x, x0, g = make(batch=2, n=2, features=(6,), seed=15)
    xv = x.requires_grad_()
    alpha = torch.full((2,), 0.01, dtype=torch.float64)
    out, _ = op(xv, x0, g.transpose(0, 1), alpha, alpha, "l2", 0.0, 1.0, True, None, 1.0)
    with pytest.raises(RuntimeError, match="not differentiable"):
        out.sum().backward()


@requires_extension
def test_op_checks_its_arguments():
    op = torch.ops.fastdiv.eot_step
    x, x0, g = make(batch=2, n=2, features=(6,), seed=16)
    rows = g.transpose(0, 1)
    a = torch.full((2,), 0.01, dtype=torch.float64)
    with pytest.raises(ValueError, match="norm"):
        op(x, x0, rows, a, a, "l3", 0.0, 1.0, True, None, 1.0)
    with pytest.raises(ValueError, match="x0"):
        op(x, x0[:, :5], rows, a, a, "linf", 0.0, 1.0, True, None, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        op(x, x0, rows, a.float(), a, "linf", 0.0, 1.0, True, None, 1.0)
    with pytest.raises(ValueError, match="momentum"):
        op(x, x0, rows, a, a, "linf", 0.0, 1.0, True, torch.zeros(2, 5, dtype=torch.float64), 1.0)
    with pytest.raises(TypeError, match="x"):
        op(x.float(), x0, rows, a, a, "linf", 0.0, 1.0, True, None, 1.0)


# =====================================================================================================
# on a GPU: the CUDA and compiled Triton kernels against the reference and the CPU kernels
# =====================================================================================================


def _eot_kwargs(norm: str) -> dict:
    return dict(alpha=1.5 / 255 if norm == "linf" else 0.3, eps=EPS8 if norm == "linf" else 0.5, norm=norm)


@pytest.mark.parametrize("with_momentum", [False, True], ids=["plain", "momentum"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_eot_step_matches_reference_and_cpu(backend, dtype, norm, with_momentum):
    dev = device_of(backend)
    x, x0, g = make(dtype=dtype, seed=3)
    kw = _eot_kwargs(norm)
    if with_momentum:
        kw.update(momentum=momentum_like(x), decay=0.9)
    got = eot_step(x.to(dev), x0.to(dev), g.to(dev), backend=backend,
                   **{k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    want = reference.eot_step(x, x0, g, **kw)
    cpu = eot_step(x, x0, g, backend=CPU_BACKEND, **kw)
    got, want, cpu = ((r,) if not with_momentum else r for r in (got, want, cpu))
    assert got[0].device.type == torch.device(dev).type and got[0].dtype == dtype and got[0].shape == x.shape
    assert torch.isfinite(got[0]).all()
    assert_out_close(got[0].cpu(), want[0], dtype, f"{backend} {norm} {dtype_id(dtype)} vs reference")
    assert_out_close(got[0].cpu(), cpu[0], dtype, f"{backend} {norm} {dtype_id(dtype)} vs {CPU_BACKEND}")
    if with_momentum:
        m_got, m_want = got[1].cpu(), want[1]
        assert m_got.dtype == dtype and m_got.shape == x.shape
        tol = 1e-12 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(m_got.double(), m_want.double(), rtol=tol, atol=tol * m_want.abs().max().item())


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_eot_step_per_example_alpha_eps(backend, norm):
    dev = device_of(backend)
    x, x0, g = make(batch=4, seed=4)
    alpha = torch.tensor([0.0, 0.01, 0.5, 2.0], dtype=torch.float64)
    eps = torch.tensor([0.05, 0.0, 0.2, 1.0], dtype=torch.float64)
    xd, x0d, gd = x.to(dev), x0.to(dev), g.to(dev)
    got = eot_step(xd, x0d, gd, alpha=alpha.to(dev), eps=eps.to(dev), norm=norm, backend=backend).cpu()
    assert_out_close(got, reference.eot_step(x, x0, g, alpha=alpha, eps=eps, norm=norm), torch.float64)
    assert_out_close(got, eot_step(x, x0, g, alpha=alpha, eps=eps, norm=norm, backend=CPU_BACKEND), torch.float64)
    # example 1: eps = 0 returns x0 exactly
    torch.testing.assert_close(got[1], x0[1], rtol=0, atol=0)
    for i in range(4):  # the per-example step is the scalar step of each example alone
        alone = eot_step(xd[i:i + 1], x0d[i:i + 1], gd[:, i:i + 1], alpha=alpha[i].item(), eps=eps[i].item(), norm=norm,
                         backend=backend)
        assert_out_close(got[i:i + 1], alone.cpu(), torch.float64, f"example {i}")


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_eot_step_sample_dim_and_strides(backend, norm):
    dev = device_of(backend)
    x, x0, g = make(batch=3, n=5, features=(2, 7, 9), seed=6)
    x, x0, g = x.to(dev), x0.to(dev), g.to(dev)
    kw = dict(alpha=0.05, eps=0.1, norm=norm, backend=backend)
    base = eot_step(x, x0, g, **kw)
    want = reference.eot_step(x.cpu(), x0.cpu(), g.cpu(), alpha=0.05, eps=0.1, norm=norm)
    assert_out_close(base.cpu(), want, torch.float64)
    big = torch.zeros(10, 6, 2, 7, 9, dtype=torch.float64, device=dev)
    big[::2, ::2] = g
    m = momentum_like(x.cpu()).to(dev)
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


@pytest.mark.parametrize("backend", GPU_SIDE)
def test_eot_step_empty_nan_and_determinism(backend):
    dev = device_of(backend)
    for norm in ("linf", "l2"):
        x, x0, g = (t.to(dev) for t in make(batch=0, features=(3, 4)))
        out = eot_step(x, x0, g, alpha=0.1, eps=0.1, norm=norm, backend=backend)
        assert out.shape == (0, 3, 4) and out.dtype == x.dtype
        out, m = eot_step(x, x0, g, alpha=0.1, eps=0.1, norm=norm, momentum=torch.zeros_like(x), backend=backend)
        assert out.shape == (0, 3, 4) and m.shape == (0, 3, 4)
        for with_momentum in (False, True):  # NaN in one example's gradient stays in that example
            x, x0, g = make(seed=12)
            g[2, 1, 0, 3, 4] = math.nan
            m = momentum_like(x) if with_momentum else None
            res = eot_step(x.to(dev), x0.to(dev), g.to(dev), alpha=0.02, eps=EPS8, norm=norm,
                           momentum=None if m is None else m.to(dev), backend=backend)
            got = (res[0] if with_momentum else res).cpu()
            assert torch.isnan(got[1]).any() and torch.isfinite(got[[0, 2]]).all()
            want = reference.eot_step(x, x0, g, alpha=0.02, eps=EPS8, norm=norm, momentum=m)
            torch.testing.assert_close(got, want[0] if with_momentum else want, rtol=1e-12, atol=1e-12, equal_nan=True)
        # the attack size: B = 128, n = 10 gradients of 3 x 32 x 32, fp32, twice
        x0 = torch.rand(128, 3, 32, 32, generator=torch.Generator(device=dev).manual_seed(0), device=dev)
        x = (x0 + 0.01 * gpu_randn(128, 3, 32, 32, seed=1)).clamp(0, 1)
        g = gpu_randn(10, 128, 3, 32, 32, seed=2)
        m = gpu_randn(128, 3, 32, 32, seed=3)
        runs = [eot_step(x, x0, g, alpha=2 / 255, eps=EPS8, norm=norm, momentum=m, backend=backend) for _ in range(2)]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), norm


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eot_step_mixed_devices_error():
    x, x0, g = make(seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="x0"):
        eot_step(x.to("cuda"), x0, g.to("cuda"), alpha=0.01, eps=0.03)
    with pytest.raises(ValueError, match="alpha"):
        eot_step(x.to("cuda"), x0.to("cuda"), g.to("cuda"), alpha=torch.full((3,), 0.01), eps=0.03)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("backend", GPU_SIDE)
def test_opcheck_on_gpu(backend, dtype):
    """The op on GPU tensors: not differentiable (its autograd raises), so schema and fake-tensor checks."""
    import fastdiv.ops  # noqa: F401  (registers the fake kernels)

    dev = device_of(backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, x0, g = (v.to(dtype).to(dev) for v in make(batch=3, n=2, features=(5, 7), seed=14))
    xv, x0v, rows = x.flatten(1), x0.flatten(1), g.transpose(0, 1).flatten(2)
    alpha = torch.full((3,), 0.01, dtype=acc, device=dev)
    eps = torch.tensor([0.0, 0.03, 1.0], dtype=acc, device=dev)
    m = momentum_like(xv).to(acc).to(dev)
    for norm in ("linf", "l2"):
        for momentum in (None, m):
            for clip in (True, False):
                opcheck(namespace(backend).eot_step.default,
                        (xv, x0v, rows, alpha, eps, norm, 0.0, 1.0, clip, momentum, 0.9),
                        test_utils=("test_schema", "test_faketensor"))
