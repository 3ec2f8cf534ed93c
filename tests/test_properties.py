"""Property tests (hypothesis) of the losses and statistics on both backends, in float64:
invariances, closed forms on orthogonal and identical rows, and identities between the losses."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastdiv
from fastdiv import reference

from conftest import BACKENDS, LOSS_CASES, STAT_FIELDS, assert_close64

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
