"""Gram-family ops: the raw Gram, the fused per-input losses (Gram + n x n head in one read of X)
and their shared pullback dX = scale (A X + beta ⊙ sign(X)) (docs/design.md §2.3), each row of it times
the row scale gram_loss returns (1 unless that row's squares leave the accumulation dtype's range:
fastdiv/csrc/head_math.h, "Row scaling").

``register(ns)`` installs the fake kernels and autograd formulas for one op namespace ('fastdiv' for
the C++ kernels, 'fastdiv_triton' for the Triton ones); the launchers take the namespace to call.
"""
from __future__ import annotations

import torch

from .schemas import acc_dtype, forbid_double_backward


def register(ns: str) -> None:
    ops = getattr(torch.ops, ns)

    # ---- fake kernels: shapes and dtypes only, for torch.compile / FakeTensor tracing ----
    @torch.library.register_fake(f"{ns}::gram")
    def _gram_fake(x, with_l1):
        b, n, _ = x.shape
        acc = acc_dtype(x.dtype)
        return x.new_empty((b, n, n), dtype=acc), x.new_empty((b, n if with_l1 else 0), dtype=acc)

    @torch.library.register_fake(f"{ns}::gram_pullback")
    def _gram_pullback_fake(x, a, beta, scale=None, row_scale=None):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @torch.library.register_fake(f"{ns}::gram_loss")
    def _gram_loss_fake(x, head, eps, jitter, p, rho_max):
        b, n, _ = x.shape
        torch._check(n >= 2, lambda: f"{ns}::gram_loss needs n >= 2 samples, got {n}")
        acc = acc_dtype(x.dtype)
        return (x.new_empty((b,), dtype=acc), x.new_empty((b, n, n), dtype=acc),
                x.new_empty((b, n if head == "sparsity" else 0), dtype=acc), x.new_empty((b, n), dtype=acc))

    @torch.library.register_fake(f"{ns}::concentration_stats")
    def _stats_fake(x, q, eps, jitter, rho_max):
        return x.new_empty((x.shape[0], 6), dtype=acc_dtype(x.dtype))

    # ---- autograd ----
    def _gram_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0])

    def _gram_backward(ctx, grad_s, grad_l1):
        if grad_s is None and grad_l1 is None:
            return None, None
        (x,) = ctx.saved_tensors
        b, n, _ = x.shape
        a = ((grad_s + grad_s.transpose(1, 2)) if grad_s is not None
             else x.new_zeros((b, n, n), dtype=acc_dtype(x.dtype)))
        beta = grad_l1 if grad_l1 is not None and grad_l1.numel() else None
        return ops.gram_pullback(x, a, beta), None

    torch.library.register_autograd(f"{ns}::gram", _gram_backward, setup_context=_gram_setup)

    def _gram_loss_setup(ctx, inputs, output):
        _, a, beta, row_scale = output
        ctx.mark_non_differentiable(a, beta, row_scale)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the coefficient outputs
        ctx.save_for_backward(inputs[0], a, beta, row_scale)

    def _gram_loss_backward(ctx, grad_loss, grad_a, grad_beta, grad_row_scale):
        if grad_loss is None:
            return None, None, None, None, None, None
        x, a, beta, row_scale = ctx.saved_tensors
        # grad_loss goes in as the kernel's per-input scale (any stride, e.g. the stride-0 expansion of
        # loss.sum().backward()): the whole backward is this one launch, no a * g, beta * g first.
        beta = beta if beta.numel() else None
        return ops.gram_pullback(x, a, beta, grad_loss, row_scale), None, None, None, None, None

    torch.library.register_autograd(f"{ns}::gram_loss", _gram_loss_backward, setup_context=_gram_loss_setup)
    forbid_double_backward(ns, "gram_pullback")


# ---- launchers (x is the [B, n, D] view made by fastdiv._checks.as_rows) ----
def gram(x: torch.Tensor, with_l1: bool = False, *, ns: str = "fastdiv") -> tuple[torch.Tensor, torch.Tensor]:
    """Raw Gram S = X X^T [B, n, n] and row l1 norms [B, n] (or [B, 0]), differentiable."""
    return getattr(torch.ops, ns).gram(x, with_l1)


def gram_loss(x: torch.Tensor, head: str, *, eps: float, jitter: float = 0.0, p: float = 0.0,
              rho_max: float = 0.0, ns: str = "fastdiv") -> torch.Tensor:
    """Per-input loss [B] of a Gram head, differentiable with a fused one-pass backward."""
    return getattr(torch.ops, ns).gram_loss(x, head, eps, jitter, p, rho_max)[0]


def concentration_stats(x: torch.Tensor, *, q: float, eps: float, jitter: float, rho_max: float,
                        ns: str = "fastdiv") -> torch.Tensor:
    """[B, 6]: rho, rho_q, kappa, mean cosine, coherence, dpp. Not differentiable."""
    return getattr(torch.ops, ns).concentration_stats(x.detach(), q, eps, jitter, rho_max)
