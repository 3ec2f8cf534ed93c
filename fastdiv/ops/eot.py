"""The fused EOT attack step (docs/design.md §2.6): mean of the n sample gradients, sign or l2 direction,
optional MI-FGSM momentum, step, projection onto the eps-ball and clamp, in one kernel.

``register(ns)`` installs the fake kernel for one op namespace (see gram.py). The op is not
differentiable (an attack step, not a loss): its autograd formula raises instead of returning a silent
zero, and the launcher below runs it on detached tensors.
"""
from __future__ import annotations

import torch

from .schemas import acc_dtype


def register(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::eot_step")
    def _eot_step_fake(x, x0, grads, alpha, eps, norm, lo, hi, clip, momentum, decay):
        b, _, d = grads.shape
        acc = acc_dtype(grads.dtype)
        return (torch.empty((b, d), dtype=x.dtype, device=x.device),
                torch.empty((b, d if momentum is not None else 0), dtype=acc, device=x.device))

    def _eot_step_backward(ctx, *grads):
        raise RuntimeError(f"{ns}::eot_step is not differentiable (an attack step); call it on detached "
                           f"tensors, as fastdiv.eot_step does")

    torch.library.register_autograd(f"{ns}::eot_step", _eot_step_backward)


def eot_step(x: torch.Tensor, x0: torch.Tensor, grads: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor, *,
             norm: str, lo: float, hi: float, clip: bool, momentum: torch.Tensor | None = None,
             decay: float = 1.0, ns: str = "fastdiv") -> tuple[torch.Tensor, torch.Tensor]:
    """x_new [B, D] (x's dtype) and new momentum [B, D] (acc; [B, 0] without momentum) from x, x0 [B, D],
    grads [B, n, D] and per-example alpha, eps [B] (acc)."""
    m = momentum.detach() if momentum is not None else None
    return getattr(torch.ops, ns).eot_step(x.detach(), x0.detach(), grads.detach(), alpha.detach(), eps.detach(),
                                           norm, lo, hi, clip, m, decay)
