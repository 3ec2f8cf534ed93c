"""The plain-PyTorch reference (fastdiv.reference) against the papers' formulas, re-derived here
independently in numpy / float64 (loops over pairs, numpy.linalg.slogdet, explicit softmin), so the
oracle of the rest of the suite is itself checked."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fastdiv import reference

from conftest import randn

SHAPES = [(3, 2, 5), (2, 4, 7), (2, 5, 3, 4), (1, 10, 30)]


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


# ---------------------------------------------------------------------------------------------------
# numpy versions of the formulas, one input (rows = the n gradients, features flattened)
# ---------------------------------------------------------------------------------------------------


def np_unit(g: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    g = g.reshape(g.shape[0], -1)
    return g / np.maximum(np.sqrt((g * g).sum(axis=1, keepdims=True)), eps)


def np_cos(g: np.ndarray) -> np.ndarray:
    """cos(g_i, g_j) = <g_i, g_j> / (||g_i|| ||g_j||), element by element."""
    g = g.reshape(g.shape[0], -1)
    n = g.shape[0]
    c = np.empty((n, n))
    for i, j in itertools.product(range(n), range(n)):
        c[i, j] = np.dot(g[i], g[j]) / (np.linalg.norm(g[i]) * np.linalg.norm(g[j]))
    return c


def np_pairs(n: int, ordered: bool):
    return [(i, j) for i in range(n) for j in range(n) if (i != j if ordered else i < j)]


def np_losses(g: np.ndarray, jitter: float = 1e-4, p: float | None = None, temperature: float | None = None,
              rho_max: float = 1 - 1e-6) -> dict[str, float]:
    n = g.shape[0]
    c = np_cos(g)
    u = np_unit(g)
    d = u.shape[1]
    # GradDiv eq. 19: R_DPP = -log det(C + jitter I)
    sign, logdet = np.linalg.slogdet(c + jitter * np.eye(n))
    assert sign > 0
    # GradDiv eq. 16: rho_hat = ||1/n sum u_i||, kappa_hat = rho (p - rho) / (1 - rho^2)
    rho = np.linalg.norm(u.mean(axis=0))
    pp = float(d if p is None else p)
    rc = min(rho, rho_max)
    kappa_hat = rc * (pp - rc) / (1 - rc ** 2)
    # Diverse Directions eq. 12-17 on Var[u_d] (population variance over the n draws)
    var = u.var(axis=0)
    t = 1.0 / d if temperature is None else temperature
    weights = np.exp(-(var - var.min()) / t)
    weights /= weights.sum()
    ordered, unordered = np_pairs(n, True), np_pairs(n, False)
    return {
        "dpp": -logdet,
        "mean": sum(c[i, j] for i, j in ordered) / (n * (n - 1)),  # eq. 17
        "kappa": kappa_hat / pp,
        "max": max(c[i, j] for i, j in ordered),
        "smoothmax": math.log(sum(math.exp(c[i, j]) for i, j in ordered)),
        "gal": math.log(sum(math.exp(c[i, j]) for i, j in unordered)),  # Kariyappa & Qureshi
        "mean_penalty": float((u.mean(axis=0) ** 2).sum()),  # eq. 14
        "var-target": float(((var - 1.0 / d) ** 2).sum()),  # eq. 17
        "var-min": float(-var.min()),  # eq. 15
        "var-softmin": float(-(weights * var).sum()),  # eq. 16
        "sparsity": float(-np.abs(u).sum(axis=1).mean()),  # eq. 18
        "rho": rho,
        "kappa_hat": kappa_hat,
    }


def ref_losses(x: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    jitter = kw.get("jitter", reference.JITTER)
    temperature = kw.get("temperature")
    out = {
        "dpp": reference.dpp_loss(x, jitter),
        "mean": reference.mean_cosine_loss(x),
        "kappa": reference.kappa_loss(x, kw.get("p")),
        "max": reference.max_cosine_loss(x),
        "smoothmax": reference.smoothmax_cosine_loss(x),
        "gal": reference.gal_loss(x),
        "mean_penalty": reference.mean_penalty(x),
        "var-target": reference.variance_penalty(x, "target"),
        "var-min": reference.variance_penalty(x, "min"),
        "var-softmin": reference.variance_penalty(x, "softmin", temperature),
        "sparsity": reference.sparsity_penalty(x),
        "rho": reference.mean_resultant_length(x),
    }
    return out


@pytest.mark.parametrize("kw", [{}, dict(jitter=1e-2, p=3.0, temperature=0.05)], ids=["defaults", "custom"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_reference_matches_numpy_formulas(shape, kw):
    x = randn(*shape, seed=sum(shape))
    got = ref_losses(x, **kw)
    for b in range(shape[0]):
        expected = np_losses(x[b].numpy(), **kw)
        for name, value in got.items():
            assert value.shape == (shape[0],), name
            np.testing.assert_allclose(value[b].item(), expected[name], rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_reference_normalize_and_cosine_gram(shape):
    x = randn(*shape, seed=3)
    u = reference.normalize(x)
    assert u.shape == x.shape
    c = reference.cosine_gram(x)
    assert c.shape == (shape[0], shape[1], shape[1])
    for b in range(shape[0]):
        np.testing.assert_allclose(u[b].reshape(shape[1], -1).numpy(), np_unit(x[b].numpy()), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(c[b].numpy(), np_cos(x[b].numpy()), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(reference.unit_rows(x).numpy(), u.reshape(shape[0], shape[1], -1).numpy())


@pytest.mark.parametrize("q", [1.0, 2.0, 3.0, math.inf], ids=lambda q: f"q={q}")
def test_reference_concentration_stats(q):
    x = randn(3, 5, 2, 4, seed=4)
    stats = reference.concentration_stats(x, q=q, jitter=1e-3)
    for b in range(3):
        g = x[b].numpy()
        e = np_losses(g, jitter=1e-3)
        m = np_unit(g).mean(axis=0)
        np.testing.assert_allclose(stats.rho[b].item(), e["rho"], rtol=1e-12)
        np.testing.assert_allclose(stats.rho_q[b].item(), np.linalg.norm(m, ord=q), rtol=1e-12)
        np.testing.assert_allclose(stats.kappa[b].item(), e["kappa_hat"], rtol=1e-10)  # p = D = 8
        np.testing.assert_allclose(stats.mean_cos[b].item(), e["mean"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stats.coherence[b].item(), e["max"], rtol=1e-10)
        np.testing.assert_allclose(stats.dpp[b].item(), e["dpp"], rtol=1e-10)


def test_reference_dpp_is_minus_logdet_of_unit_gram():
    """GradDiv eq. 19 writes R_DPP = -log det(G^T G) with G the matrix of unit gradients as columns:
    det of the Gram of the unit vectors (a volume), so the jitter-free limit must match it."""
    x = randn(2, 3, 6, seed=5)
    for b in range(2):
        g = np_unit(x[b].numpy()).T  # D x n, columns are unit gradients
        sign, logdet = np.linalg.slogdet(g.T @ g)
        assert sign > 0
        np.testing.assert_allclose(reference.dpp_loss(x, jitter=1e-12)[b].item(), -logdet, rtol=1e-8)


def test_reference_kappa_hat_formula_and_clamp():
    rho = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0, 1.2], dtype=torch.float64)
    p = 7.0
    k = reference.kappa_hat(rho, p, rho_max=0.95)
    rc = np.minimum(rho.numpy(), 0.95)
    np.testing.assert_allclose(k.numpy(), rc * (p - rc) / (1 - rc ** 2), rtol=1e-14)
    assert k[0] == 0
    # the clamp makes kappa_hat constant above rho_max, and finite at rho = 1
    assert k[4] == k[5] == k[3:].max() and math.isfinite(k[4].item())
    # kappa_loss = kappa_hat(rho, p = D) / D with rho the mean resultant length
    x = randn(2, 4, 9, seed=6)
    rho_x = reference.mean_resultant_length(x)
    np.testing.assert_allclose(reference.kappa_loss(x).numpy(), (reference.kappa_hat(rho_x, 9.0) / 9).numpy(),
                               rtol=1e-14)


def test_reference_gal_and_smoothmax_relation():
    """GAL sums each unordered pair once, smoothmax each ordered pair: smoothmax = GAL + log 2."""
    x = randn(4, 6, 5, seed=7)
    np.testing.assert_allclose(reference.smoothmax_cosine_loss(x).numpy(),
                               (reference.gal_loss(x) + math.log(2)).numpy(), rtol=1e-12)


def test_reference_mean_penalty_is_rho_squared_and_mean_relation():
    """Omega_M = rho^2 = (n + n(n-1) R_mean) / n^2 (sum of all cosines, docs/design.md §2.1)."""
    x = randn(3, 5, 8, seed=8)
    n = 5
    rho = reference.mean_resultant_length(x)
    np.testing.assert_allclose(reference.mean_penalty(x).numpy(), (rho ** 2).numpy(), rtol=1e-12)
    np.testing.assert_allclose(reference.mean_penalty(x).numpy(),
                               ((n + n * (n - 1) * reference.mean_cosine_loss(x)) / n ** 2).numpy(), rtol=1e-12)


def test_reference_variance_head():
    var = torch.tensor([[0.1, 0.02, 0.3, 0.05], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    d = 4
    np.testing.assert_allclose(reference.variance_head(var, "target").numpy(),
                               ((var.numpy() - 1 / d) ** 2).sum(axis=1), rtol=1e-14)
    np.testing.assert_allclose(reference.variance_head(var, "min").numpy(), -var.numpy().min(axis=1))
    for t in (None, 0.01, 10.0):
        tt = 1 / d if t is None else t
        w = np.exp(-var.numpy() / tt)
        w /= w.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(reference.variance_head(var, "softmin", t).numpy(), -(w * var.numpy()).sum(axis=1),
                                   rtol=1e-12)
    # a very low temperature approaches the hard min, a very high one the plain mean
    np.testing.assert_allclose(reference.variance_head(var, "softmin", 1e-6).numpy(),
                               reference.variance_head(var, "min").numpy(), rtol=1e-6)
    np.testing.assert_allclose(reference.variance_head(var, "softmin", 1e6).numpy(), -var.numpy().mean(axis=1),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        reference.variance_head(var, "median")


def test_reference_column_variance_is_population_variance():
    x = randn(2, 5, 7, seed=9)
    v = reference.column_variance(x)
    for b in range(2):
        np.testing.assert_allclose(v[b].numpy(), np_unit(x[b].numpy()).var(axis=0, ddof=0), rtol=1e-12, atol=1e-15)


def test_reference_sparsity_range():
    """-||u||_1 lies in [-sqrt(D), -1] for a nonzero unit vector: -1 for a one-hot gradient,
    -sqrt(D) for a flat one."""
    d = 16
    one_hot = torch.zeros(1, 2, d, dtype=torch.float64)
    one_hot[0, :, 3] = 2.0
    flat = torch.ones(1, 2, d, dtype=torch.float64)
    assert reference.sparsity_penalty(one_hot).item() == pytest.approx(-1.0)
    assert reference.sparsity_penalty(flat).item() == pytest.approx(-math.sqrt(d))


def test_reference_zero_rows_and_eps():
    """u = g / ||g|| above the norm floor; rows at or below eps have no direction: u = 0 (cosine 0),
    never NaN."""
    x = randn(1, 3, 4, seed=10)
    x[0, 1] = 0
    u = reference.unit_rows(x)
    assert torch.equal(u[0, 1], torch.zeros(4, dtype=torch.float64))
    c = reference.cosine_gram(x)
    assert c[0, 1].abs().max() == 0 and c[0, :, 1].abs().max() == 0
    small = torch.full((1, 2, 4), 1e-3, dtype=torch.float64)  # ||row|| = 2e-3 < eps = 1e-2
    assert torch.equal(reference.unit_rows(small, eps=1e-2), torch.zeros(1, 2, 4, dtype=torch.float64))
    np.testing.assert_allclose(reference.unit_rows(small, eps=1e-3).numpy(), np.full((1, 2, 4), 0.5), rtol=1e-12)
    leaf = small.clone().requires_grad_()
    reference.unit_rows(leaf, eps=1e-2).sum().backward()
    assert torch.equal(leaf.grad, torch.zeros_like(small))  # below the floor: no gradient either


def test_reference_constants_documented():
    assert reference.EPS == 1e-12
    assert reference.JITTER == 1e-4
    assert reference.RHO_MAX == 1 - 1e-6
    assert reference.VARIANCE_KINDS == ("target", "min", "softmin")
    # docstring: fully aligned rows, n = 10: -(n-1) log(jitter) - log(n + jitter) ~ 80.6
    x = randn(1, 1, 5, seed=11).expand(2, 10, 5)
    np.testing.assert_allclose(reference.dpp_loss(x).numpy(), -9 * math.log(1e-4) - math.log(10 + 1e-4), rtol=1e-6)


def test_reference_head_dtype():
    for dtype, acc in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                       (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        x = randn(2, 3, 4, seed=12).to(dtype)
        for fn in (reference.dpp_loss, reference.mean_cosine_loss, reference.kappa_loss, reference.mean_penalty,
                   reference.sparsity_penalty, reference.variance_penalty, reference.gal_loss):
            assert fn(x).dtype == acc, (fn.__name__, dtype)
