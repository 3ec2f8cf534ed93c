"""Row-normalization ops: u = x / ||x|| (0 below the norm floor) and the per-column statistics of u
behind the Diverse-Directions variance penalties, each with a fused pullback.

``register(ns)`` installs the fake kernels and autograd for one op namespace (see gram.py).
"""
from __future__ import annotations

import torch

from .schemas import acc_dtype, forbid_double_backward


def register(ns: str) -> None:
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::normalize")
    def _normalize_fake(x, eps):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @torch.library.register_fake(f"{ns}::normalize_pullback")
    def _normalize_pullback_fake(x, grad, eps):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @torch.library.register_fake(f"{ns}::column_stats")
    def _column_stats_fake(x, eps):
        b, n, d = x.shape
        acc = acc_dtype(x.dtype)
        return x.new_empty((b, n), dtype=acc), x.new_empty((b, d), dtype=acc), x.new_empty((b, d), dtype=acc)

    @torch.library.register_fake(f"{ns}::column_stats_pullback")
    def _column_stats_pullback_fake(x, r, mean, grad_r, grad_mean, grad_var, eps):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    def _normalize_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.eps = inputs[1]

    def _normalize_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ops.normalize_pullback(x, grad, ctx.eps), None

    torch.library.register_autograd(f"{ns}::normalize", _normalize_backward, setup_context=_normalize_setup)

    def _column_stats_setup(ctx, inputs, output):
        r, mean, _ = output
        ctx.set_materialize_grads(False)  # unused outputs (usually r and mean) reach the kernel as None
        ctx.save_for_backward(inputs[0], r, mean)
        ctx.eps = inputs[1]

    def _column_stats_backward(ctx, grad_r, grad_mean, grad_var):
        x, r, mean = ctx.saved_tensors
        return ops.column_stats_pullback(x, r, mean, grad_r, grad_mean, grad_var, ctx.eps), None

    torch.library.register_autograd(f"{ns}::column_stats", _column_stats_backward,
                                    setup_context=_column_stats_setup)
    forbid_double_backward(ns, "normalize_pullback")
    forbid_double_backward(ns, "column_stats_pullback")


def normalize(x: torch.Tensor, eps: float, *, ns: str = "fastdiv") -> torch.Tensor:
    """u = x / ||x|| row-wise on a [B, n, D] view (0 below the norm floor); contiguous, x's dtype."""
    return getattr(torch.ops, ns).normalize(x, eps)


def column_stats(x: torch.Tensor, eps: float, *,
                 ns: str = "fastdiv") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row norms r [B, n], column mean and population variance of u over the n rows [B, D]."""
    return getattr(torch.ops, ns).column_stats(x, eps)
