"""The contract of the fastdiv ops, shared by all their glue: the schemas as the C++ library defines them in
fastdiv/csrc/ops.cpp (a test checks they agree), the op namespace of each backend, the dtype of their
statistic outputs, and the rule that the pullback ops are first-order only.

The Triton backend defines the same schemas under its own namespace, ``fastdiv_triton``, from this
list (fastdiv/ops/__init__.py): C++ owns the ``fastdiv`` namespace, and a Triton-only install has no C++ to
read them from.
"""
import torch

SCHEMAS = {
    "gram": "gram(Tensor x, bool with_l1) -> (Tensor, Tensor)",
    "gram_pullback": "gram_pullback(Tensor x, Tensor a, Tensor? beta, Tensor? scale=None, Tensor? row_scale=None) "
                     "-> Tensor",
    "gram_loss": "gram_loss(Tensor x, str head, float eps, float jitter, float p, float rho_max) -> "
                 "(Tensor, Tensor, Tensor, Tensor)",
    "concentration_stats": "concentration_stats(Tensor x, float q, float eps, float jitter, float rho_max) -> Tensor",
    "normalize": "normalize(Tensor x, float eps) -> Tensor",
    "normalize_pullback": "normalize_pullback(Tensor x, Tensor grad, float eps) -> Tensor",
    "column_stats": "column_stats(Tensor x, float eps) -> (Tensor, Tensor, Tensor)",
    "column_stats_pullback": "column_stats_pullback(Tensor x, Tensor r, Tensor mean, Tensor? grad_r, "
                             "Tensor? grad_mean, Tensor? grad_var, float eps) -> Tensor",
    "eot_step": "eot_step(Tensor x, Tensor x0, Tensor grads, Tensor alpha, Tensor eps, str norm, float lo, "
                "float hi, bool clip, Tensor? momentum, float decay) -> (Tensor, Tensor)",
}

#: op namespace of each compiled backend
NAMESPACES = {"cpu": "fastdiv", "cuda": "fastdiv", "triton": "fastdiv_triton"}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels, and so of their loss, coefficient and statistic outputs: fp64 for
    fp64 inputs, fp32 otherwise (acc_scalar_type in fastdiv/csrc/checks.h)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def forbid_double_backward(ns: str, op: str) -> None:
    """Pullback kernels are first-order only; differentiating through them raises instead of silently
    returning zeros."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{ns}::{op} has no derivative: double backward through a fastdiv loss is not supported "
            f"(create_graph=True on the loss's own backward). Use backend='torch' for that.")

    torch.library.register_autograd(f"{ns}::{op}", backward)
