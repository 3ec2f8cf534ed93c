"""Shared fixtures, loss table and numerical helpers of the fastdiv test suite.

Test modules import the helpers with ``from conftest import ...`` (pytest puts this directory on
``sys.path`` because ``tests/`` is not a package).
"""
from __future__ import annotations

import os

# Triton reads this when it is imported: the whole session runs Triton kernels (marker `triton`) through
# its interpreter on CPU tensors. Harmless where triton is not installed.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import fastdiv
from fastdiv import reference
from fastdiv.nn import RandomizedModule

# ---------------------------------------------------------------------------------------------------
# The losses under test: every Gram-family loss, and the three Omega_V kinds as separate cases.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossCase:
    """One public loss with fixed keyword arguments, and its plain reference (per input, ``[B]``)."""

    id: str
    fn: Callable[..., torch.Tensor]
    ref: Callable[..., torch.Tensor]
    kwargs: tuple = ()

    def __call__(self, grads: torch.Tensor, **kw) -> torch.Tensor:
        return self.fn(grads, **dict(self.kwargs), **kw)

    def reference(self, grads: torch.Tensor, **kw) -> torch.Tensor:
        return self.ref(grads, **dict(self.kwargs), **kw)

    def __repr__(self) -> str:  # readable parametrize ids
        return self.id


LOSS_CASES = [
    LossCase("dpp", fastdiv.dpp_loss, reference.dpp_loss),
    LossCase("mean", fastdiv.mean_cosine_loss, reference.mean_cosine_loss),
    LossCase("kappa", fastdiv.kappa_loss, reference.kappa_loss),
    LossCase("max", fastdiv.max_cosine_loss, reference.max_cosine_loss),
    LossCase("smoothmax", fastdiv.smoothmax_cosine_loss, reference.smoothmax_cosine_loss),
    LossCase("gal", fastdiv.gal_loss, reference.gal_loss),
    LossCase("mean_penalty", fastdiv.mean_penalty, reference.mean_penalty),
    LossCase("var-target", fastdiv.variance_penalty, reference.variance_penalty, (("kind", "target"),)),
    LossCase("var-min", fastdiv.variance_penalty, reference.variance_penalty, (("kind", "min"),)),
    LossCase("var-softmin", fastdiv.variance_penalty, reference.variance_penalty, (("kind", "softmin"),)),
    LossCase("sparsity", fastdiv.sparsity_penalty, reference.sparsity_penalty),
]
LOSS_IDS = [c.id for c in LOSS_CASES]
LOSS_BY_ID = {c.id: c for c in LOSS_CASES}

#: 'cpu' = compiled C++ kernels, 'torch' = fastdiv.reference.
BACKENDS = ["cpu", "torch"]
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LOWP_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STAT_FIELDS = fastdiv.ConcentrationStats._fields


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS[dtype]


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reproducible standard normal tensor (its own generator, independent of test order)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def upstream_weights(batch: int, seed: int = 1) -> torch.Tensor:
    """Distinct positive per-input weights for ``reduction='none'`` backward, so a wrong per-input
    scaling of the gradient cannot hide behind a uniform upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, generator=gen, dtype=torch.float64) + 0.5


def value_and_grad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, weights: torch.Tensor | None = None):
    """Runs ``fn`` on a fresh leaf copy of ``x``; returns (output as float64, d(sum w*out)/dx as float64)."""
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    if weights is None:
        weights = torch.ones(out.shape, dtype=torch.float64)
    weights = weights.reshape(weights.shape + (1,) * (out.dim() - weights.dim())).expand_as(out)
    (out * weights.to(out.dtype)).sum().backward()
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    return out.detach().double(), grad.double()


# ---------------------------------------------------------------------------------------------------
# Parity rule for reduced precision.
# ---------------------------------------------------------------------------------------------------

#: Absolute error floor per input dtype, relative to max(1, max |fp64 ground truth|). It only matters
#: when the reference happens to be (nearly) exact in that dtype; it is far below the dtype's epsilon
#: (fp32 1.2e-7 -> floor 1e-6 of the fp32-rounded result's scale; fp16 eps 9.8e-4; bf16 eps 7.8e-3).
PARITY_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-6, torch.bfloat16: 1e-4, torch.float16: 1e-5}


def assert_parity(fused: torch.Tensor, ref_lowp: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                  what: str = "value") -> None:
    """The parity rule for a fused result computed from an input rounded to ``dtype``:

        err_fused = max |fused - ref64|,   err_ref = max |ref_lowp - ref64|,
        err_fused <= 2 * err_ref + PARITY_FLOOR[dtype] * max(1, max |ref64|)

    where ``ref64`` is the fp64 reference on the unrounded input (ground truth) and ``ref_lowp`` the
    reference evaluated on the same ``dtype`` input. So the fused kernel may be at most about as wrong
    as the plain PyTorch formula in that precision (the kernels accumulate in fp32, so they are usually
    better); both see the same input rounding.
    """
    fused, ref_lowp, ref64 = fused.double(), ref_lowp.double(), ref64.double()
    assert fused.shape == ref64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(ref64).all(), f"{what}: the fp64 ground truth is not finite"
    assert torch.isfinite(fused).all(), f"{what}: fused result has NaN/Inf: {fused}"
    if fused.numel() == 0:
        return
    err_fused = (fused - ref64).abs().max().item()
    err_ref = (ref_lowp - ref64).abs().max().item() if torch.isfinite(ref_lowp).all() else math.inf
    scale = max(1.0, ref64.abs().max().item())
    tol = 2 * err_ref + PARITY_FLOOR[dtype] * scale
    assert err_fused <= tol, (f"{what} ({dtype}): fused error {err_fused:.3e} > 2 * reference error "
                              f"{err_ref:.3e} + floor {PARITY_FLOOR[dtype] * scale:.1e}")


def assert_as_accurate(got: torch.Tensor, truth: torch.Tensor, ref: torch.Tensor, ref_truth: torch.Tensor,
                       dtype: torch.dtype, what: str = "value") -> None:
    """The parity rule for results on two inputs with the same answer: ``got`` on one input (``truth``, the
    fp64 result on the same data) must be at most about as wrong as ``ref`` on the other (``ref_truth``):

        max |got - truth| <= 2 * max |ref - ref_truth| + PARITY_FLOOR[dtype] * max(1, max |ref_truth|)

    E.g. rows scaled by powers of two against the same rows at scale 1: the losses depend on g / ||g||
    only, so a kernel must be as accurate on the scaled rows as on the unscaled ones."""
    got, truth, ref, ref_truth = got.double(), truth.double(), ref.double(), ref_truth.double()
    assert got.shape == truth.shape == ref.shape == ref_truth.shape, f"{what}: shapes differ"
    assert torch.isfinite(truth).all() and torch.isfinite(ref_truth).all(), f"{what}: the fp64 truth is not finite"
    assert torch.isfinite(got).all(), f"{what}: result has NaN/Inf: {got}"
    if got.numel() == 0:
        return
    err = (got - truth).abs().max().item()
    err_ref = (ref - ref_truth).abs().max().item()
    tol = 2 * err_ref + PARITY_FLOOR[dtype] * max(1.0, ref_truth.abs().max().item())
    assert err <= tol, f"{what} ({dtype}): error {err:.3e} > 2 * error at the reference input {err_ref:.3e} + floor"


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, what: str = "", rtol: float = 1e-9,
                   atol: float = 1e-10) -> None:
    """fp64-level agreement, with the absolute tolerance scaled by the magnitude of ``expected``."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of the precision the kernels accumulate in for ``dtype`` inputs: fp64 for fp64, fp32 for every
    reduced precision (fp32, bf16, fp16). The rounding of a half-precision *output* is separate."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def gamma(k: int, dtype: torch.dtype) -> float:
    """Higham's gamma_k = k u / (1 - k u): the relative error bound of k rounded operations in a row
    (any order of summation), e.g. of a length-k dot product, whatever the vector width, FMA use or
    thread split of the machine that computes it."""
    ku = k * unit_roundoff(dtype)
    assert ku < 0.5, f"gamma_{k} is no bound at u = {unit_roundoff(dtype):.1e}"
    return ku / (1 - ku)


# ---------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """Every test starts with a fixed seed and without a FASTDIV_BACKEND override from the caller's shell."""
    monkeypatch.delenv("FASTDIV_BACKEND", raising=False)
    torch.manual_seed(0)


class Noise(RandomizedModule):
    """Additive Gaussian noise, one draw per sample model: the sampling protocol's example layer,
    shared by the tests of sample_input_grads and of the attacks."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x):
        k = self.active_samples()
        eps = self.draw((x.shape[0] // k, *x.shape[1:]), like=x)
        return x + self.sigma * eps.reshape(x.shape)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than two and immune to OpenMP spinning when the
    machine is busy (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


requires_extension = pytest.mark.skipif(not fastdiv.extension_built(), reason="fastdiv._C is not built")
