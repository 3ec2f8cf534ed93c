"""Property tests (hypothesis) of the losses and statistics on both backends, in float64:
invariances, closed forms on orthogonal and identical rows, and identities between the losses; and in
fp32 / bf16 / fp16, rows at any scale of their range against the float64 results on the same data."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastdiv
from fastdiv import reference

from conftest import BACKENDS, LOSS_CASES, STAT_FIELDS, assert_as_accurate, assert_close64, dtype_id

SETTINGS = settings(max_examples=25, deadline=None, database=None, derandomize=True)

seeds = st.integers(min_value=0, max_value=2**31 - 1)
# B, n, D; D >= 3 keeps cosines away from the +-1 ties that make R_max non-differentiable
dims = st.tuples(st.integers(1, 3), st.integers(2, 6), st.integers(3, 12))


def gaussian(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def positive_scales(shape, seed: int) -> torch.Tensor:
    """Per-row factors spread over 1e-3 .. 1e3 (log-uniform)."""
    u = torch.rand(*shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return torch.pow(10.0, 6 * u - 3)


def losses_and_grads(x: torch.Tensor, backend: str):
    """{loss id: (per-input values, gradient)} for every loss."""
    out = {}
    for case in LOSS_CASES:
        leaf = x.clone().requires_grad_()
        v = case(leaf, backend=backend, reduction="none")
        v.sum().backward()
        out[case.id] = (v.detach(), leaf.grad)
    return out


def stats(x, backend, **kw):
    return fastdiv.concentration_stats(x, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(shape=dims, seed=seeds)
def test_invariant_to_positive_row_scaling(backend, shape, seed):
    b, n, d = shape
    x = gaussian(shape, seed)
    s = positive_scales((b, n, 1), seed)
    base, scaled = losses_and_grads(x, backend), losses_and_grads(x * s, backend)
    for name in base:
        assert_close64(scaled[name][0], base[name][0], f"{name} value", rtol=1e-8, atol=1e-9)
        # u depends on g / ||g||, so d/dg of the scaled input is the gradient divided by the scale
        assert_close64(scaled[name][1] * s, base[name][1], f"{name} gradient", rtol=1e-7, atol=1e-8)
    for q in (1.0, math.inf):
        st0, st1 = stats(x, backend, q=q), stats(x * s, backend, q=q)
        for field in STAT_FIELDS:
            assert_close64(getattr(st1, field), getattr(st0, field), field, rtol=1e-8, atol=1e-9)
    assert_close64(fastdiv.cosine_gram(x * s, backend=backend), fastdiv.cosine_gram(x, backend=backend), "cosine_gram")
    assert_close64(fastdiv.normalize(x * s, backend=backend), fastdiv.normalize(x, backend=backend), "normalize")


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(shape=dims, seed=seeds, data=st.data())
def test_invariant_to_sample_permutation(backend, shape, seed, data):
    b, n, d = shape
    perm = torch.tensor(data.draw(st.permutations(range(n))))
    x = gaussian(shape, seed)
    base, permuted = losses_and_grads(x, backend), losses_and_grads(x[:, perm], backend)
    for name in base:
        assert_close64(permuted[name][0], base[name][0], f"{name} value", rtol=1e-9, atol=1e-10)
        assert_close64(permuted[name][1], base[name][1][:, perm], f"{name} gradient", rtol=1e-7, atol=1e-9)
    for q in (1.0, 2.0, math.inf):
        st0, st1 = stats(x, backend, q=q), stats(x[:, perm], backend, q=q)
        for field in STAT_FIELDS:
            assert_close64(getattr(st1, field), getattr(st0, field), field, rtol=1e-9, atol=1e-10)
    c = fastdiv.cosine_gram(x, backend=backend)
    assert_close64(fastdiv.cosine_gram(x[:, perm], backend=backend), c[:, perm][:, :, perm], "cosine_gram")


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(b=st.integers(1, 3), n=st.integers(2, 8), extra=st.integers(0, 10), seed=seeds,
       jitter=st.sampled_from([1e-4, 1e-3, 1e-2]))
def test_orthogonal_rows(backend, b, n, extra, seed, jitter):
    """Rows of an orthogonal matrix (D >= n), positively scaled: C = I."""
    d = n + extra
    q, _ = torch.linalg.qr(gaussian((b, d, n), seed))  # orthonormal columns
    x = q.transpose(1, 2) * positive_scales((b, n, 1), seed)
    kw = dict(backend=backend, reduction="none")
    r_dpp = fastdiv.dpp_loss(x, jitter=jitter, **kw)
    assert (r_dpp.abs() <= n * jitter * 1.01).all(), r_dpp
    assert_close64(r_dpp, torch.full((b,), -n * math.log1p(jitter), dtype=torch.float64), "R_DPP",
                   rtol=1e-8, atol=1e-12)
    zeros = torch.zeros(b, dtype=torch.float64)
    assert_close64(fastdiv.mean_cosine_loss(x, **kw), zeros, "R_mean", atol=1e-12)
    assert_close64(fastdiv.max_cosine_loss(x, **kw), zeros, "R_max", atol=1e-12)
    assert_close64(fastdiv.smoothmax_cosine_loss(x, **kw), torch.full((b,), math.log(n * (n - 1)), dtype=torch.float64),
                   "R_smoothmax", atol=1e-12)
    assert_close64(fastdiv.mean_penalty(x, **kw), torch.full((b,), 1.0 / n, dtype=torch.float64), "Omega_M", atol=1e-12)
    s = stats(x, backend)
    assert_close64(s.rho, torch.full((b,), 1 / math.sqrt(n), dtype=torch.float64), "rho", atol=1e-12)
    assert_close64(s.mean_cos, zeros, "mean_cos", atol=1e-12)
    assert_close64(fastdiv.cosine_gram(x, backend=backend), torch.eye(n, dtype=torch.float64).expand(b, n, n),
                   "C = I", atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(b=st.integers(1, 3), n=st.integers(2, 10), d=st.integers(1, 12), seed=seeds)
def test_identical_rows(backend, b, n, d, seed):
    """Rows equal up to positive scale: rho = 1, coherence = 1, every cosine 1."""
    v = gaussian((b, 1, d), seed)
    x = v * positive_scales((b, n, 1), seed)
    ones = torch.ones(b, dtype=torch.float64)
    s = stats(x, backend)
    assert_close64(s.rho, ones, "rho", atol=1e-12)
    assert_close64(s.coherence, ones, "coherence", atol=1e-12)
    assert_close64(s.mean_cos, ones, "mean_cos", atol=1e-12)
    j = reference.JITTER
    assert_close64(s.dpp, torch.full((b,), -(n - 1) * math.log(j) - math.log(n + j), dtype=torch.float64), "dpp",
                   rtol=1e-6)
    kw = dict(backend=backend, reduction="none")
    assert_close64(fastdiv.max_cosine_loss(x, **kw), ones, "R_max", atol=1e-12)
    assert_close64(fastdiv.mean_penalty(x, **kw), ones, "Omega_M", atol=1e-12)
    # kappa is clamped at rho_max: constant kappa_hat(rho_max) / D, zero gradient
    rm = reference.RHO_MAX
    leaf = x.clone().requires_grad_()
    k = fastdiv.kappa_loss(leaf, **kw)
    assert_close64(k, torch.full((b,), rm * (d - rm) / (1 - rm * rm) / d, dtype=torch.float64), "R_kappa", rtol=1e-6)
    k.sum().backward()
    assert leaf.grad.abs().max() == 0
    # Var[u_d] = 0 in every column
    assert_close64(fastdiv.variance_penalty(x, kind="min", **kw), torch.zeros(b, dtype=torch.float64), "-min Var",
                   atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(shape=dims, seed=seeds)
def test_identities_between_losses(backend, shape, seed):
    x = gaussian(shape, seed)
    kw = dict(backend=backend, reduction="none")
    s = stats(x, backend)
    assert_close64(fastdiv.mean_penalty(x, **kw), s.rho ** 2, "mean_penalty == rho^2")
    assert_close64(fastdiv.gal_loss(x, **kw), fastdiv.smoothmax_cosine_loss(x, **kw) - math.log(2),
                   "gal == smoothmax - log 2")
    assert_close64(s.mean_cos, fastdiv.mean_cosine_loss(x, **kw), "mean_cos == mean_cosine_loss")
    assert_close64(s.coherence, fastdiv.max_cosine_loss(x, **kw), "coherence == max_cosine_loss")
    assert_close64(s.dpp, fastdiv.dpp_loss(x, **kw), "dpp == dpp_loss")
    d = x[0, 0].numel()
    assert_close64(s.kappa / d, fastdiv.kappa_loss(x, **kw), "kappa / D == kappa_loss")
    for jitter, rho_max in [(1e-2, 0.5), (1e-6, 0.99)]:
        s2 = stats(x, backend, jitter=jitter, rho_max=rho_max)
        assert_close64(s2.dpp, fastdiv.dpp_loss(x, jitter=jitter, **kw), "dpp (jitter)")
        assert_close64(s2.kappa / d, fastdiv.kappa_loss(x, rho_max=rho_max, **kw), "kappa (rho_max)")
    assert_close64(stats(x, backend, q=2.0).rho_q, s.rho, "rho_q(q=2) == rho")
    # orderings that hold for any input
    assert (s.coherence >= s.mean_cos - 1e-12).all()
    assert (s.rho <= 1 + 1e-12).all() and (s.rho >= 0).all()
    assert (fastdiv.max_cosine_loss(x, **kw) <= fastdiv.smoothmax_cosine_loss(x, **kw)).all()


@SETTINGS
@given(shape=dims, seed=seeds)
def test_backends_agree(shape, seed):
    x = gaussian(shape, seed)
    fused, ref = losses_and_grads(x, "cpu"), losses_and_grads(x, "torch")
    for name in fused:
        assert_close64(fused[name][0], ref[name][0], f"{name} value")
        assert_close64(fused[name][1], ref[name][1], f"{name} gradient", rtol=1e-8)
    for field in STAT_FIELDS:
        assert_close64(getattr(stats(x, "cpu"), field), getattr(stats(x, "torch"), field), field)


# Rows whose squares leave the accumulation dtype's range (docs/losses.md): row i of an input scaled by
# 2^k_i, each k_i drawn from the dtype's range (fp32 and bf16 squares overflow from |g| ~ 2^64 and flush
# to 0 below ~2^-75; 2^+-100 ~ 1e+-30; fp16 accumulates in fp32, and its scales keep the inputs and their
# gradients, ~2^-k, normal fp16 numbers). A norm floor of 1e-36 keeps the tiniest rows (norm ~2^-100
# sqrt(D)) above it.
ROW_EXPONENTS = {torch.float32: (-100, 100), torch.bfloat16: (-100, 100), torch.float16: (-6, 6)}
TINY_EPS = 1e-36


def _everything(x: torch.Tensor, backend: str, w: torch.Tensor) -> dict:
    """{name: (value, gradient)} of every loss, normalize and cosine_gram, and the statistics (no gradient),
    in float64; the upstream weights w [B] weigh each input's outputs."""
    out = {}
    fns = [(c.id, lambda t, c=c: c(t, backend=backend, reduction="none", eps=TINY_EPS)) for c in LOSS_CASES]
    fns += [(fn.__name__, lambda t, fn=fn: fn(t, backend=backend, eps=TINY_EPS))
            for fn in (fastdiv.normalize, fastdiv.cosine_gram)]
    for name, fn in fns:
        leaf = x.clone().requires_grad_()
        v = fn(leaf)
        (v * w.to(v.dtype).view(-1, *([1] * (v.dim() - 1)))).sum().backward()
        out[name] = (v.detach().double(), leaf.grad.double())
    for q in (1.0, math.inf):
        st_ = stats(x, backend, q=q, eps=TINY_EPS)
        for field in STAT_FIELDS:
            out[f"{field} q={q}"] = (getattr(st_, field).double(), None)
    return out


@pytest.mark.parametrize("dtype", list(ROW_EXPONENTS), ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(shape=dims, seed=seeds, data=st.data())
def test_rows_at_any_scale_match_float64(backend, dtype, shape, seed, data):
    """Every result on rows scaled by 2^k_i (k_i drawn per row) is as accurate against the float64 results
    on the same data as on the unscaled rows (assert_as_accurate); gradients times the row scale."""
    b, n, d = shape
    lo, hi = ROW_EXPONENTS[dtype]
    k = torch.tensor(data.draw(st.lists(st.integers(lo, hi), min_size=b * n, max_size=b * n)), dtype=torch.float64)
    f = torch.pow(2.0, k).view(b, n, 1)
    base = gaussian(shape, seed).to(dtype)
    x = (base.double() * f).to(dtype)
    w = torch.rand(b, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64) + 0.5
    got, ref = _everything(x, backend, w), _everything(base, backend, w)
    t_got, t_ref = _everything(x.double(), "torch", w), _everything(base.double(), "torch", w)
    for name in got:
        assert_as_accurate(got[name][0], t_got[name][0], ref[name][0], t_ref[name][0], dtype, f"{name} value")
        if got[name][1] is not None:
            assert_as_accurate(got[name][1] * f, t_got[name][1] * f, ref[name][1], t_ref[name][1], dtype,
                               f"{name} gradient")
